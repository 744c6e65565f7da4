"""Teachers from a model folder on this machine: the engines (vLLM, transformers) and the Ray actor around them."""
