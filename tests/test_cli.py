"""The command line: instant help, clear errors, no traceback for bad input."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _onpolicy(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "onpolicy.cli", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); from onpolicy.cli import build_parser; build_parser(); "
            "heavy=[m for m in ('torch','vllm','ray','transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    t = time.perf_counter()
    res = _onpolicy("--help")
    elapsed = time.perf_counter() - t
    assert res.returncode == 0 and "train" in res.stdout and "demo" in res.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.2f}s"


def test_bad_config_field_fails_before_anything_starts():
    res = _onpolicy("train", "configs/toy.yaml", "optim.lrr=3", "rollout.max_new_tokens=0")
    assert res.returncode == 2
    assert "optim.lrr" in res.stderr and "rollout.max_new_tokens" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-student"
    res = _onpolicy("train", "configs/toy.yaml", f"model.student={missing}", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert str(missing) in res.stderr and "student" in res.stderr


def test_resume_without_a_checkpoint_is_an_error_before_engines_start(tmp_path):
    res = _onpolicy("train", "configs/toy.yaml", f"output_dir={tmp_path / 'run'}", "--resume")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no checkpoint in" in res.stderr and "Start without --resume" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_tensor_parallel_is_refused_on_cpu_before_engines_start(tmp_path):
    from onpolicy.engines.vllm import check_tensor_parallel

    res = _onpolicy("train", "configs/toy.yaml", f"output_dir={tmp_path / 'run'}", "rollout.tensor_parallel_size=2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "rollout.tensor_parallel_size=2 needs GPUs" in res.stderr and "rollout.num_workers" in res.stderr
    check_tensor_parallel(2, cuda_devices=2)  # enough GPUs: accepted
    try:
        check_tensor_parallel(4, cuda_devices=2)
    except ValueError as err:
        assert "needs 4 GPUs per engine" in str(err)
    else:
        raise AssertionError("4-way tensor parallelism on 2 GPUs was accepted")
