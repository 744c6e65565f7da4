"""Teachers: score the student's sampled tokens (local vLLM / transformers models, as Ray actors).

Importing this package imports neither vLLM nor torch; the backends import them when built.
"""

from onpolicy.teacher.actor import ActorTeacher, TeacherActor, make_local_teacher
from onpolicy.teacher.fingerprint import (
    TeacherIncompatible,
    check_compatible,
    describe_model,
    tokenizer_fingerprint,
)
from onpolicy.teacher.local import HFTeacher, VLLMTeacher

__all__ = [
    "ActorTeacher",
    "HFTeacher",
    "TeacherActor",
    "TeacherIncompatible",
    "VLLMTeacher",
    "check_compatible",
    "describe_model",
    "make_local_teacher",
    "tokenizer_fingerprint",
]
