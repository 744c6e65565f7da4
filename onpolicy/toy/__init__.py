"""The embedded toy task (addition with reversed answers) and its teacher/student models, built with
the tiny-model kit (`onpolicy.kit`).

Kept import-light: nothing here imports torch or transformers until a model is built or run.
Entry points: `onpolicy.toy.build.build_toy_models`, `onpolicy.toy.models.greedy_accuracy`.
"""

from pathlib import Path

from onpolicy.toy.task import AdditionTask, Example, is_correct

# The toy models' chat template (a user turn is the prompt's text): for serving one behind a chat endpoint.
CHAT_TEMPLATE = Path(__file__).parent / "chat_template.jinja"

__all__ = ["CHAT_TEMPLATE", "AdditionTask", "Example", "is_correct"]
