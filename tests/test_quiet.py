"""Quiet means quiet: `onpolicy train` of a Parquet source prints none of `datasets`' progress bars ("Generating
train split: ...") unless asked (`--verbose`). The real command line, in its own process; the source has a bad
row so the run stops, with its one error line, right after reading the data (no engine starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAR = "Generating train split"


def _train(tmp_path: Path, name: str, student: Path, teacher: Path, *flags: str) -> subprocess.CompletedProcess:
    import pandas as pd

    rows = [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)]
    rows[3]["question"] = None
    source = tmp_path / f"{name}.parquet"  # a file of its own: `datasets` generates (and shows) each split once
    pd.DataFrame(rows).to_parquet(source)
    env = {k: v for k, v in os.environ.items() if k not in ("ONPOLICY_DEBUG", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env["HF_DATASETS_CACHE"] = str(tmp_path / f"cache-{name}")
    return subprocess.run(
        [sys.executable, "-m", "onpolicy.cli", *flags, "train", "configs/toy.yaml", f"model.student={student}",
         f"teacher.model={teacher}",
         f"output_dir={tmp_path / name}", "data.task=dataset", f"data.source={source}", "data.prompt_field=question",
         "data.answer_field=answer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_train_on_parquet_prints_only_its_own_line_by_default(tiny_model_dir, tiny_teacher_dir, tmp_path):
    res = _train(tmp_path, "quiet", tiny_model_dir, tiny_teacher_dir)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert BAR not in out and "%|" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onpolicy: error: ") and "row 3" in lines[0], out


def test_verbose_shows_the_libraries_progress_bars(tiny_model_dir, tiny_teacher_dir, tmp_path):
    res = _train(tmp_path, "verbose", tiny_model_dir, tiny_teacher_dir, "--verbose")
    assert res.returncode != 0 and BAR in res.stderr, res.stdout + res.stderr
