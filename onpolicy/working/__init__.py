"""The second embedded task: column arithmetic with the working written out (`task.py`), and its teacher
and mid-trained student built with the tiny-model kit (`models.py`, `build.py`, prebuilt `assets/`).

Kept import-light: nothing here imports torch or transformers until a model is built or run.
"""

from onpolicy.working.task import WorkingTask, render

__all__ = ["WorkingTask", "render"]
