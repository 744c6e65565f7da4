"""Experiment trackers behind `logging.report_to`: each gets what metrics.jsonl gets, read back with the
tracker's own reader; a missing package is refused before a run starts, naming the extra."""

from __future__ import annotations

import sys

import pytest

from onpolicy.config import ConfigError, load_config
from onpolicy.metrics import MetricsLog, read_metrics
from onpolicy.trackers import check_trackers, open_trackers, scalars

TRAIN = {"teacher_kl": 0.75, "loss": -0.25, "sequences": 32, "note": "text", "bad": float("nan")}


def write_two_steps(out, names):
    trackers = open_trackers(names, out, project="onpolicy-test", run_name="t", config={"model": {"dtype": "f32"}})
    log = MetricsLog(out / "metrics.jsonl", 2, show_progress=False, trackers=trackers)
    log.train(1, TRAIN)
    log.train(2, {**TRAIN, "teacher_kl": 0.5})
    log.eval(2, {"heldout_reverse_kl": 1.5})
    log.close()
    assert [r["teacher_kl"] for r in read_metrics(out / "metrics.jsonl", kind="train")] == [0.75, 0.5]


def test_scalars_keep_finite_numbers_only():
    assert scalars("train", {"kind": "train", "step": 3, "time": 1.0, **TRAIN}) == {
        "train/teacher_kl": 0.75, "train/loss": -0.25, "train/sequences": 32.0}


def test_config_parses_report_to_and_refuses_unknown_trackers():
    assert load_config(None, ["logging.report_to=[tensorboard, wandb]"]).logging.report_to == ["tensorboard", "wandb"]
    assert load_config(None, []).logging.report_to == []
    with pytest.raises(ConfigError, match=r"logging\.report_to\.0"):
        load_config(None, ["logging.report_to=[comet]"])


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python sees when wandb is not installed
    with pytest.raises(ValueError, match=r"wandb \(needs wandb\) not installed: pip install 'onpolicy\[trackers\]'"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["tensorboard"])


def test_tensorboard_event_file_holds_the_train_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_two_steps(tmp_path, ["tensorboard"])
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/teacher_kl")] == [(1, 0.75), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/heldout_reverse_kl")] == [(2, 1.5)]
    assert "train/note" not in acc.Tags()["scalars"] and "train/bad" not in acc.Tags()["scalars"]


def test_wandb_offline_run_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tracker,) = open_trackers(["wandb"], tmp_path, project="onpolicy-test", run_name="t", config={})
    assert tracker.run.offline  # no key: nothing leaves the machine, and nothing waits on a login
    log = MetricsLog(tmp_path / "metrics.jsonl", 2, show_progress=False, trackers=[tracker])
    log.train(1, TRAIN)
    log.train(2, {**TRAIN, "teacher_kl": 0.5})
    log.eval(2, {"heldout_reverse_kl": 1.5})
    assert tracker.run.summary["train/teacher_kl"] == 0.5 and tracker.run.summary["eval/heldout_reverse_kl"] == 1.5
    assert "train/note" not in tracker.run.summary.keys()  # noqa: SIM118 (`in` on a wandb Summary looks up 0)
    log.close()
    # What `wandb sync` uploads later. (Its content is not checked: wandb-core may still be writing it
    # when finish() returns, seen here in 2 of 5 runs.)
    assert len(list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))) == 1


def test_mlflow_file_store_records_the_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_two_steps(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("onpolicy-test").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/teacher_kl")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.75), (2, 0.5)]
    assert run.data.params["model.dtype"] == "f32" and run.info.status == "FINISHED"
