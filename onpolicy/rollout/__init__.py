"""Rollout workers: vLLM engines sampling the student, and the pool that fans work out over them
(importing this package imports neither vLLM nor torch nor Ray)."""
