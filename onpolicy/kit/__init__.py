"""The kit for tiny models, shared by the toy task, the chat example, the tests and the benches.

- `spec.py`: `ModelSpec` (arch llama | qwen2, shape, training recipe), the shape rule vLLM's CPU
  attention sets, the spec hash, the transformers config and a seeded random-init model.
- `train.py`: one supervised loop over (prompt_ids, completion_ids) pairs with the lr of
  `onpolicy.learner.schedule`, the batch builder, greedy decoding and exact-match accuracy.
- `build.py`: build-and-cache of model folders (`build.json` with the spec hash; reuse, copy a
  prebuilt folder, or make), and a random-init model saved as a folder (the tests' tiny models).

A task brings only what is its own: prompts and answers, a tokenizer, its specs. Kept import-light:
torch and transformers load when a model is made or run.
"""
