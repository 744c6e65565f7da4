"""onpolicy: on-policy distillation as a service.

Rollout workers (vLLM on Ray) sample from the student, a teacher scores every sampled token,
and a learner lowers the per-token reverse KL to the teacher on the student's own samples.
Importing this package is cheap: torch, vLLM and Ray load only where they are used.
"""

__version__ = "0.1.0"
