"""Students made from their teacher (`onpolicy student init`): depth and width pruning of a Llama or Qwen2
folder, importance from activation statistics on calibration prompts (Minitron's recipe). docs/students.md."""
