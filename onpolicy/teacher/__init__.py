"""Teachers: score the student's sampled tokens and sample completions of their own.
`factory.open_teacher(cfg)` makes any kind: local models (vLLM / transformers, in a Ray actor or
in-process) or remote endpoints (our service, vLLM, SGLang), all behind `onpolicy.protocols.Teacher`.

Importing this package imports neither vLLM nor torch nor httpx; the modules import what they use.
"""
