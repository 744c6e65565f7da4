"""Server-side limits on what one REST run may ask of the cluster, and the resources it is made to reserve.

The config's own bounds are what the code can run (256 rollout workers, 1024 learner ranks, 65536 prompts
of 32768 tokens a step, a 1 TiB KV cache); over REST the operator's limits apply on top. The CPUs a run
reserves per actor are raised to a server-set minimum, so admission (`required_cpus`, checked against the
cluster's free CPUs) cannot be talked down to 0 by a client.
"""

from __future__ import annotations

from dataclasses import dataclass

from onpolicy.config import RunConfig
from services.control.policy import PolicyError


@dataclass
class RunCaps:
    max_rollout_workers: int = 16
    max_learner_ranks: int = 16
    max_tensor_parallel: int = 8
    max_step_tokens: int = 1 << 22
    """prompts_per_step x samples_per_prompt x max_new_tokens, and the same for an evaluation."""
    max_kv_cache_gib: int = 64
    min_actor_cpus: float = 0.5
    """Ray CPUs each rollout worker and learner rank reserves at least (the config's value if larger)."""

    def check(self, cfg: RunConfig) -> None:
        """PolicyError naming the first field over the server's limit, and the environment variable to raise it."""
        r = cfg.rollout
        step = r.prompts_per_step * r.samples_per_prompt * r.max_new_tokens
        ood_splits = 1 + (getattr(cfg.data, "unseen_digits", None) is not None)  # `ood`, and `unseen` if set
        probes = sum(p.num_prompts for p in cfg.eval.retention)
        evals = (cfg.eval.num_prompts + ood_splits * cfg.eval.ood_num_prompts + probes) * r.max_new_tokens
        for where, value, cap, env in (
            ("rollout.num_workers", r.num_workers, self.max_rollout_workers, "ONPOLICY_MAX_ROLLOUT_WORKERS"),
            ("learner.num_ranks", cfg.learner.num_ranks, self.max_learner_ranks, "ONPOLICY_MAX_LEARNER_RANKS"),
            ("rollout.tensor_parallel_size", r.tensor_parallel_size, self.max_tensor_parallel,
             "ONPOLICY_MAX_TENSOR_PARALLEL"),
            ("resources.vllm_kv_cache_gib", cfg.resources.vllm_kv_cache_gib, self.max_kv_cache_gib,
             "ONPOLICY_MAX_KV_CACHE_GIB"),
            ("rollout.prompts_per_step", step, self.max_step_tokens, "ONPOLICY_MAX_STEP_TOKENS"),
            ("eval.num_prompts", evals, self.max_step_tokens, "ONPOLICY_MAX_STEP_TOKENS"),
        ):
            if value > cap:
                what = {"rollout.prompts_per_step": "prompts_per_step x samples_per_prompt x max_new_tokens = ",
                        "eval.num_prompts": "(eval.num_prompts + eval.ood_num_prompts per OOD split + the "
                                            "eval.retention probes' prompts) x max_new_tokens = "}
                raise PolicyError(where, f"{where}: {what.get(where, '')}{value} is above this server's limit of "
                                         f"{cap} for a run started over the API; ask for less, or the operator can "
                                         f"raise {env}")

    def apply_minimums(self, cfg: RunConfig) -> None:
        """Raise each actor's reserved CPUs to the server's minimum (in place)."""
        res = cfg.resources
        res.worker_num_cpus = max(res.worker_num_cpus, self.min_actor_cpus)
        res.learner_num_cpus = max(res.learner_num_cpus, self.min_actor_cpus)
