"""The chat example (`scripts/build_chat_example.py`, `configs/chat-lora.yaml`): arithmetic word problems
as conversations, a Qwen2-style tokenizer with a ChatML template, and a Qwen2 teacher and student."""
