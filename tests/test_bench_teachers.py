"""bench/teachers.py's read-out (no runs): the share of the gap closed, and a row read back from a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import teachers as bench  # bench/teachers.py: its pure functions


def test_gap_closed_is_the_share_of_the_student_to_teacher_gap():
    assert bench.gap_closed(0.5, 0.9, 1.0) == 0.8
    assert bench.gap_closed(0.5, 0.4, 1.0) < 0 and bench.gap_closed(0.9, 0.9, 0.9) is None


def test_a_row_is_read_back_from_its_run_folder(tmp_path):
    records = [{"kind": "train", "step": 1, "teacher_tokens_processed": 100, "teacher_span_coverage": 0.99},
               {"kind": "train", "step": 2, "teacher_tokens_processed": 200, "teacher_span_coverage": 0.98}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"steps": 2, "distill_wall_seconds": 12.3, "teachers": [{"name": "teacher", "mode": "span"}],
               "before": {"heldout_accuracy": 0.5}, "after": {"heldout_accuracy": 0.9}}
    row = bench.row_result("cross", summary, tmp_path)
    assert (row["teacher_tokens"], row["coverage"], row["modes"]) == (200, 0.98, [("teacher", "span")])
    row.update(teacher=1.0, gap=bench.gap_closed(0.5, 0.9, 1.0))
    table = bench.render([row])
    assert "| cross | teacher (span) | 2 | 12 | 200 | 0.500 -> **0.900** | 1.000 | 0.80 | 0.980 |" in table
