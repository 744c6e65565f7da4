"""Experiment trackers (`logging.report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets every record `MetricsLog` writes to metrics.jsonl, its numbers under `<kind>/<name>` at the
record's step (e.g. `train/teacher_kl`, `eval/heldout_reverse_kl`). The packages are optional extras
(`pip install onpolicy[trackers]`), imported only when a run asks for them; `check_trackers` refuses a
missing one before anything starts.

- tensorboard: event files in `<output_dir>/tensorboard` (torch's SummaryWriter).
- wandb: `WANDB_MODE` is honoured; without it the run logs offline (files in `<output_dir>/wandb`, sync
  later with `wandb sync`) unless `WANDB_API_KEY` is set, so no run ever waits on a login prompt.
- mlflow: `MLFLOW_TRACKING_URI` is honoured; without it a file store in `<output_dir>/mlruns` (MLflow 3
  calls it maintenance mode and wants MLFLOW_ALLOW_FILE_STORE=true, which is set for it; `mlflow ui
  --backend-store-uri <output_dir>/mlruns` reads it).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

# tracker -> the module it needs, and the package that provides it
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
          "mlflow": ("mlflow", "mlflow-skinny")}
_SKIPPED = {"kind", "step", "time"}


class Tracker(Protocol):
    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: list[str]) -> None:
    """Refuse trackers whose package is not installed, naming the fix (before a run starts anything)."""
    missing = [f"{name} (needs {_NEEDS[name][1]})" for name in names if importlib.util.find_spec(_NEEDS[name][0]) is None]
    if missing:
        raise ValueError(f"logging.report_to: {', '.join(missing)} not installed: pip install 'onpolicy[trackers]' "
                         "(or remove it from logging.report_to)")


def scalars(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, named `<kind>/<name>` (bools count; strings, lists and NaN do not)."""
    out = {}
    for key, value in metrics.items():
        if key in _SKIPPED or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        for name, value in scalars(kind, metrics).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config, mode=mode,
                              reinit="create_new")
        # Our step is the x-axis of every chart. (wandb's own `step=` would hold back a train record until a
        # later step arrives, and drop an eval record of a step already committed.)
        self.run.define_metric("step")
        for kind in ("train", "eval"):
            self.run.define_metric(f"{kind}/*", step_metric="step")

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({"step": step, **scalars(kind, metrics)})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the run folder: no server, no database package (alembic) needed
            uri = (out_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless this is set.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        for key, value in _flatten(config).items():
            self.client.log_param(self.run_id, key, value)

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in scalars(kind, metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # mlflow caps a param's length
    return out


def open_trackers(names: list[str], out_dir: str | Path, *, project: str, run_name: str,
                  config: dict[str, Any]) -> list[Tracker]:
    """Start the named trackers for a run writing to `out_dir` (`config`: the resolved run config)."""
    check_trackers(names)
    out = Path(out_dir)
    made: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardTracker(out))
        elif name == "wandb":
            made.append(WandbTracker(out, project, run_name, config))
        else:
            made.append(MlflowTracker(out, project, run_name, config))
    return made
