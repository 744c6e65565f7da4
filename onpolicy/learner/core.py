"""The learner: a torch student, its optimizer, and one training step (plain Python, no Ray).

`self.step` is the policy version the learner holds: 0 = the initial weights, and each
`train_step` produces version step + 1. The Ray actor in `actor.py` only forwards to this class.

Dtypes: trainable weights and the AdamW state stay float32 whatever `model.dtype` says (the master
weights); with bfloat16/float16 the forward runs under autocast in that dtype, which matches the
engines serving the student in it, and the weight push sends it. Log-softmax is always float32.
float16 also scales the loss (`optim.loss_scaling`). A LoRA student (`model.lora`) keeps its frozen
base in `model.dtype` and trains only the float32 adapter, which is also all a push sends.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from onpolicy.config import ReverseKLLossConfig, RunConfig
from onpolicy.engines import collective
from onpolicy.engines.hf_head import final_hidden, head_logprobs, output_head
from onpolicy.learner import checkpoint as ckpt_files
from onpolicy.learner import distributed as dist_lib
from onpolicy.learner import lora as lora_lib
from onpolicy.learner.batch import LearnBatch, build_batch, pack_sequences, split_micro_batches
from onpolicy.learner.chunked import micro_batch_loss
from onpolicy.learner.hidden import HiddenTerm, capture
from onpolicy.learner.losses import sampled_kl_metrics, token_advantages
from onpolicy.learner.objectives import get_objective
from onpolicy.learner.schedule import lr_at
from onpolicy.model_dir import require_model_dir
from onpolicy.types import Rollout, ScoreRequestItem, TeacherScores, WeightUpdate

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAINER_STATE = "trainer_state.pt"
DCP_DIR = "dcp"  # a learner group's sharded model + optimiser (torch.distributed.checkpoint)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Learner:
    """Holds the student and its AdamW optimizer; trains on rollouts scored by the teacher."""

    def __init__(
        self, model_path: str, cfg: RunConfig, *, device: str | None = None, total_steps: int | None = None,
        rank: int = 0, world: int = 1,
    ):
        """`rank`/`world` > 1: one rank of a learner group (the process group already joined, see
        `distributed.py`): the student is sharded with FSDP2 and each rank runs its share of micro-batches."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = require_model_dir(model_path, "student")
        if cfg.threads()["learner"] > 0:
            torch.set_num_threads(cfg.threads()["learner"])
        self.cfg = cfg
        self.model_path = str(model_path)
        self.device = resolve_device(device if device is not None else cfg.resources.learner_device)
        self.total_steps = total_steps if total_steps is not None else cfg.schedule.steps
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.lora = cfg.model.lora
        dtype = _DTYPES[cfg.model.dtype]
        # Weights that train are float32 masters; a LoRA student's frozen base may sit in the compute dtype.
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if self.lora else torch.float32)
        if self.lora is not None:
            self.model = lora_lib.wrap_lora(self.model, self.lora, str(path))
        self.model.to(self.device)
        self.rank, self.world = rank, world
        self._sync = None  # the weight-sync group with the engines (open_sync), on rank 0
        if world > 1:
            if self.lora is not None:
                raise ValueError("learner.num_ranks > 1 trains full-parameter students; a LoRA student uses one rank")
            dist_lib.shard(self.model)
        # Eval mode throughout: the importance ratio compares against a sampler without dropout.
        self.model.eval()
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        self.push_dtype = dtype  # what the engines serve
        self.pad_id = self._pad_id()
        o = cfg.optim
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # loss.hidden: its projections (if the widths differ) train with the student, and only the student is pushed
        self.hidden = HiddenTerm.for_run(cfg, self.model)
        if self.hidden is not None:
            self.hidden.to(self.device)
        self.optimized = self.trainable + ([] if self.hidden is None else list(self.hidden.parameters()))
        self.optimizer = torch.optim.AdamW(
            self.optimized, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if o.loss_scaling else None
        self.objective = get_objective(cfg.loss.kind)
        self.step = 0
        # Bytes a push sends (sizes only, nothing copied), and what sending every weight would.
        full = self.model.state_dict() if self.lora is None else lora_lib.base_tensors(self.model)
        self.full_push_bytes = sum(t.numel() for t in full.values()) * self.push_dtype.itemsize
        self.push_bytes = self.full_push_bytes if self.lora is None else self.push_dtype.itemsize * sum(
            p.numel() for p in self.trainable)

    def _pad_id(self) -> int:
        for tok_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tok_id is not None:
                return int(tok_id)
        return 0

    # ----- training -----------------------------------------------------------------------------

    def _set_lora_dropout(self, on: bool) -> None:
        """LoRA dropout acts only in the gradient forward; scoring and the ratio's log-probs never see it."""
        if self.lora is not None and self.lora.dropout > 0:
            for name, module in self.model.named_modules():
                if name.endswith(".lora_dropout.default"):
                    module.train(on)

    def _micro_batch_loss(self, mb: LearnBatch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one micro-batch divided by the WHOLE batch's normaliser, and the learner's
        log-probs of the sampled tokens (detached, for metrics); the head and the loss over chunks of
        `optim.chunk_tokens` completion positions (chunked.py)."""
        with capture(self.hidden, self.model) as student_states:
            out = micro_batch_loss(self.model, mb, self.objective, self.cfg.loss, normalizer,
                                   chunk_tokens=self.cfg.optim.chunk_tokens, autocast_dtype=self.autocast_dtype)
        loss, logprobs_BT = out.loss, out.learner_logprobs_BT
        if self.hidden is not None:
            term = self.hidden.loss(student_states, mb.teacher_hidden_BTLH, mb.mask_BT, self._hidden_normalizer)
            self._hidden_total += float(term.detach())
            loss = loss + term
        return loss, logprobs_BT

    def compute_gradients(self, rollouts: list[Rollout], scores: list[TeacherScores]) -> dict[str, float]:
        """Zero the gradients and accumulate the whole batch's loss gradient over micro-batches.

        Each micro-batch's loss is divided by the whole batch's token (or sequence) count, so the
        summed gradient equals the gradient of the single-big-batch loss. Returns the loss and the
        sampled-token metrics; does not step the optimizer."""
        batch = build_batch(rollouts, scores, pad_id=self.pad_id, with_topk=self.objective.needs_topk,
                            mask_truncated=self.cfg.loss.mask_truncated, with_hidden=self.hidden is not None)
        self._hidden_normalizer, self._hidden_total = float(max(batch.num_tokens, 1)), 0.0
        lc = self.cfg.loss
        if isinstance(lc, ReverseKLLossConfig):  # A_t with its baseline over the whole batch, not per micro-batch
            batch.advantages_BT = token_advantages(batch.sampler_logprobs_BT, batch.teacher_logprobs_BT,
                                                   batch.mask_BT, kl_coef=lc.kl_coef, gamma=lc.gamma,
                                                   baseline=lc.baseline)
        normalizer = float(
            batch.num_tokens if self.cfg.loss.normalize == "token" else batch.num_nonempty_sequences
        )
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros(())
        learner_lp_BT = torch.zeros_like(batch.mask_BT)
        mbs = split_micro_batches(batch, self.cfg.optim.micro_batch_size)
        rows = [sum(mb.num_sequences for mb in mbs[:i]) for i in range(len(mbs))]
        mine, empty = dist_lib.my_micro_batches(len(mbs), self.rank, self.world)
        self._set_lora_dropout(True)
        try:
            for i in mine:
                loss, lp_BT = self._micro_batch_loss(mbs[i].to(self.device), normalizer)
                scaled = loss * self.world if self.world > 1 else loss  # FSDP averages the ranks' gradients
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
                total_loss += loss.detach().cpu()
                learner_lp_BT[rows[i] : rows[i] + mbs[i].num_sequences, : lp_BT.shape[1]] = lp_BT.cpu()
            for _ in range(empty):  # every rank runs as many forwards as the busiest (FSDP collectives)
                loss, _ = self._micro_batch_loss(mbs[0].to(self.device), normalizer)
                (loss * 0.0).backward()
        finally:
            self._set_lora_dropout(False)
        if self.world > 1:
            dist_lib.sum_across(learner_lp_BT)
            dist_lib.sum_across(total_loss)
        # reverse_kl masks ratios over its ratio_max; for the other losses, which mask none, the fraction over
        # the default is a staleness diagnostic
        ratio_max = {"ratio_max": lc.ratio_max} if isinstance(lc, ReverseKLLossConfig) else {}
        metrics = sampled_kl_metrics(learner_lp_BT, batch.sampler_logprobs_BT, batch.teacher_logprobs_BT,
                                     batch.mask_BT, **ratio_max)
        metrics["loss"] = float(total_loss)
        if self.hidden is not None:  # the term unweighted, over the micro-batches this rank ran
            metrics["hidden_loss"] = self._hidden_total / self.hidden.cfg.weight
        metrics["learn_tokens"] = float(batch.num_tokens)
        return metrics

    def train_step(self, rollouts: list[Rollout], scores: list[TeacherScores]) -> dict[str, float]:
        """One optimizer update on these rollouts; the learner then holds version step + 1."""
        if not rollouts:
            raise ValueError("train_step needs at least one rollout")
        start = time.perf_counter()
        metrics = self.compute_gradients(rollouts, scores)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = dist_lib.full(torch.nn.utils.clip_grad_norm_(self.optimized, self.cfg.optim.grad_clip))
        lr = lr_at(self.step, self.cfg.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # A non-finite loss or gradient never reaches the weights: the step is skipped and counted (the driver
        # fails the run after schedule.max_nonfinite_steps in a row). With loss scaling the scaler does this.
        skipped = self.scaler is None and not (math.isfinite(metrics["loss"]) and math.isfinite(float(grad_norm)))
        metrics["skipped_nonfinite"] = float(skipped)
        if self.scaler is None:
            if not skipped:
                self.optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            metrics["loss_scale"] = float(self.scaler.get_scale())
        self.optimizer.zero_grad(set_to_none=True)
        lengths = [len(r.completion_ids) for r in rollouts]
        metrics.update(
            grad_norm=float(grad_norm),
            lr=lr,
            policy_lag=self.step - sum(r.policy_version for r in rollouts) / len(rollouts),
            completion_len_mean=sum(lengths) / len(lengths),
            truncated_frac=sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            push_bytes=float(self.push_bytes),
            full_push_bytes=float(self.full_push_bytes),
        )
        self.step += 1
        metrics["learn_seconds"] = time.perf_counter() - start
        return metrics

    # ----- weights and scoring ------------------------------------------------------------------

    def _hf_tensors(self) -> dict[str, torch.Tensor]:
        """The student's weights under Hugging Face names, the adapter merged in (a LoRA student)."""
        if self.lora is None:
            return {name: dist_lib.full(t) for name, t in self.model.state_dict().items()}
        base = lora_lib.base_tensors(self.model)
        merged = lora_lib.merge_lora(base, dict(lora_lib.adapter_tensors(self.model)), self.adapter_config())
        return {**base, **merged}

    def adapter_config(self) -> dict:
        return lora_lib.adapter_config(self.model)

    def weights(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, detached contiguous CPU copy, in `dtype` if given) for every
        state-dict entry, a LoRA adapter merged in; the names vLLM's `load_weights` accepts
        (`model.layers.0.self_attn.q_proj.weight`, ...). Copies, so a snapshot does not change when
        training goes on."""
        return [
            (name, t.detach().to("cpu", dtype=dtype, copy=True).contiguous())
            for name, t in self._hf_tensors().items()
        ]

    def weight_update(self) -> WeightUpdate:
        """What a push sends, in the engines' dtype: every weight, or a LoRA student's adapter alone."""
        if self.lora is not None:
            return WeightUpdate(version=self.step, tensors=lora_lib.adapter_tensors(self.model, self.push_dtype),
                                adapter_config=self.adapter_config())
        return WeightUpdate(version=self.step, tensors=self.weights(self.push_dtype))

    # ----- collective weight sync (engines/collective.py) -------------------------------------------

    def weight_meta(self) -> collective.WeightMeta:
        """Names, shapes and dtype of a full push (no tensor is gathered)."""
        sd = self.model.state_dict()
        return collective.WeightMeta(tuple(sd), tuple(tuple(t.shape) for t in sd.values()),
                                     str(self.push_dtype).removeprefix("torch."))

    def open_sync(self, address: str, port: int, world: int, timeout_s: float) -> None:
        """(Rank 0.) Host the weight-sync group: this learner is its rank 0, the engines 1..world-1."""
        from concurrent.futures import ThreadPoolExecutor

        self._sync = collective.open_group(address, port, 0, world, self.device, timeout_s)
        self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="weight-sync")

    def broadcast_weights(self) -> dict[str, float]:
        """Gather the weights (every rank of a group takes part) and, on rank 0, broadcast them to the engines
        in the background (a copy: training goes on meanwhile; pushes go out in order)."""
        version, tensors = self.step, self.weights(self.push_dtype)
        if self.rank != 0:
            return {"version": version}
        t0 = time.perf_counter()
        self._sync_thread.submit(collective.send, self._sync, version, tensors)
        return {"version": version, "bytes": float(sum(t.numel() * t.element_size() for _, t in tensors)),
                "gather_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def score(self, items: list[ScoreRequestItem]) -> list[list[float]]:
        """log pi(completion token t | prompt, completion[:t]) for each item, under the current weights."""
        if not items:
            return []
        packed = pack_sequences(
            [it.prompt_ids for it in items], [it.completion_ids for it in items], self.pad_id
        )
        rows, cols = packed.mask_BT.nonzero(as_tuple=True)  # row-major: each sequence's tokens in order
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden_BTH = final_hidden(self.model, packed.input_ids_BT.to(self.device),
                                      packed.attention_mask_BT.to(self.device))
        hidden_NH = hidden_BTH[rows.to(self.device), cols.to(self.device)]
        lp_N, _, _ = head_logprobs(output_head(self.model), hidden_NH, packed.target_ids_BT[rows, cols],
                                   chunk_tokens=self.cfg.optim.chunk_tokens, autocast_dtype=self.autocast_dtype)
        lps, ends = lp_N.tolist(), [sum(packed.completion_lens[: b + 1]) for b in range(len(items))]
        return [lps[end - n : end] for end, n in zip(ends, packed.completion_lens)]

    # ----- checkpoints --------------------------------------------------------------------------

    def save_model(self, path: str | os.PathLike) -> None:
        """The student as a Hugging Face folder (weights, config, tokenizer); a LoRA student merged. Written
        aside and sealed like a checkpoint (`checkpoint.seal`: a marker with each file's SHA-256, then a
        rename), so a folder at `path` is always a whole student: a crash mid-write leaves the previous one."""
        path = Path(path)
        tmp = ckpt_files.staging_dir(path, create=self.rank == 0)
        self._write_model(tmp)
        if self.rank == 0:
            ckpt_files.seal(tmp, path)

    def _write_model(self, path: Path) -> None:
        """`save_model`'s files, written straight into `path`."""
        if self.world > 1:  # every rank gathers, rank 0 writes
            tensors = self._hf_tensors()
            if self.rank == 0:
                path.mkdir(parents=True, exist_ok=True)
                self.model.save_pretrained(str(path), state_dict=tensors)
                self.tokenizer.save_pretrained(str(path))
            return
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is None:
            self.model.save_pretrained(str(path))
        else:
            self.model.get_base_model().save_pretrained(str(path), state_dict=self._hf_tensors())
        self.tokenizer.save_pretrained(str(path))

    def _save_trained(self, path: Path) -> None:
        """What a checkpoint holds besides the trainer state: the HF folder, or a LoRA student's adapter
        (PEFT's files, naming the base model) and tokenizer; `onpolicy export --merge` merges one."""
        if self.lora is None:
            self._write_model(path)
            return
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    def save_checkpoint(self, path: str | os.PathLike, extra_json: dict[str, dict] | None = None) -> None:
        """HF folder + `trainer_state.pt` (optimizer, step, RNG) + `extra_json` files (the driver's state),
        written to a temporary folder next to `path`, sealed with a completion marker and renamed into
        place (`checkpoint.seal`): a crash never leaves a checkpoint that looks whole and is not.

        A learner group writes the model and optimiser with torch.distributed.checkpoint into `dcp/`
        (each rank its shards; any number of ranks loads it) and the HF folder gathered on rank 0."""
        path = Path(path)
        tmp = ckpt_files.staging_dir(path, shared=self.world > 1, create=self.rank == 0)
        dist_lib.barrier()
        self._save_trained(tmp)
        if self.world > 1:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        if self.rank == 0:
            state = {
                "step": self.step,
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                # loss.hidden's projections: a training artefact, kept here and never in the exported student
                "hidden": self.hidden.state_dict() if self.hidden is not None else {},
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": random.getstate(),
                },
            }
            if self.world == 1:
                state["optimizer"] = self.optimizer.state_dict()
            torch.save(state, tmp / TRAINER_STATE)
            for name, content in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(content))
        dist_lib.barrier()
        if self.rank == 0:
            ckpt_files.seal(tmp, path, learner_ranks=self.world)
        dist_lib.barrier()

    def _init_optimizer_state(self) -> None:
        """Give AdamW its state tensors (a zero-gradient step at lr 0 changes no weight), so that
        torch.distributed.checkpoint has a template to load the saved state into."""
        if self.optimizer.state:
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        decays = [g["weight_decay"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        for p in self.optimized:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for g, lr, wd in zip(self.optimizer.param_groups, lrs, decays):
            g["lr"], g["weight_decay"] = lr, wd

    def _load_dcp(self, path: Path) -> None:
        """Model and optimiser from a learner group's `dcp/` folder, resharded to this learner's ranks
        (one rank included: N ranks save, M load)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from onpolicy.learner.dcp_reader import load_dcp

        self._init_optimizer_state()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        load_dcp(state, str(path / DCP_DIR))  # no pickle runs: restricted metadata, weights_only entries
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer state, step and RNG from `save_checkpoint`'s folder."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"no {TRAINER_STATE} in checkpoint folder: {path}")
        marker = ckpt_files.verify(path)  # sizes, SHA-256s, the HMAC where a secret is set; nothing unlisted
        group = ckpt_files.learner_ranks(marker) > 1
        if (path / DCP_DIR).is_dir() != group:
            raise ValueError(f"checkpoint {path}: its {ckpt_files.MARKER} says {ckpt_files.learner_ranks(marker)} "
                             f"learner rank(s) wrote it, but it {'lacks' if group else 'has'} a {DCP_DIR}/ folder; "
                             "refusing to load it (only a learner group's checkpoint is read with "
                             "torch.distributed.checkpoint)")
        if group:
            self._load_dcp(path)
        elif self.world > 1:
            raise ValueError(f"checkpoint {path} was written by one learner rank (no {DCP_DIR}/): resume it with "
                             "learner.num_ranks=1")
        elif self.lora is not None:
            from safetensors.torch import load_file

            if not (path / lora_lib.ADAPTER_WEIGHTS).is_file():
                raise FileNotFoundError(f"no {lora_lib.ADAPTER_WEIGHTS} in checkpoint folder {path}: it was not "
                                        "written by a LoRA student (model.lora must match the run that wrote it)")
            lora_lib.load_adapter_tensors(self.model, load_file(str(path / lora_lib.ADAPTER_WEIGHTS)))
        else:
            # safetensors only: a pytorch_model.bin beside it would be a pickle
            loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
            self.model.load_state_dict(loaded.state_dict())  # in place: the optimizer keeps its params
            del loaded
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)  # tensors and plain data only
        if self.hidden is not None and state.get("hidden"):
            self.hidden.load_state_dict(state["hidden"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
