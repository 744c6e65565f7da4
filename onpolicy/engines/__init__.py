"""Inference engines shared by the rollout workers and the local teacher (vLLM today)."""
