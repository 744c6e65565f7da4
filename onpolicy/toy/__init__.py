"""The embedded toy task (addition with reversed answers) and its teacher/student models, built with
the tiny-model kit (`onpolicy.kit`).

Kept import-light: nothing here imports torch or transformers until a model is built or run.
Entry points: `onpolicy.toy.build.build_toy_models`, `onpolicy.toy.models.greedy_accuracy`.
"""

from onpolicy.toy.task import AdditionTask, Example, is_correct

__all__ = ["AdditionTask", "Example", "is_correct"]
