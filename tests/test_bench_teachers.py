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


def test_the_kept_skill_is_read_from_the_retention_probe_in_both_two_teacher_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "teacher_tokens_processed": 10}))
    summary = {"steps": 1, "distill_wall_seconds": 1.0, "teachers": [{"name": "toy", "mode": "token"}],
               "before": {"heldout_accuracy": 0.2, "source_main_heldout_accuracy": 0.2},
               "after": {"heldout_accuracy": 0.6, "source_main_heldout_accuracy": 0.6},
               "retention": {"keep": {"accuracy_before": 0.9, "accuracy_after": 0.4, "reverse_kl_to_start_after": 0.7,
                                      "flagged": True}}}
    row = bench.row_result("two_noself", summary, tmp_path)
    assert (row["kept_before"], row["kept_after"], row["kept_kl_to_start"]) == (0.9, 0.4, 0.7)
    table = bench.render([row])
    assert "| (two_noself: kept) | 1-2 digit sums (retention probe) 0.900 -> 0.400, reverse KL to the start 0.700 |" in table
    assert "| (two_noself: main) | 3-digit sums (toy teacher) 0.200 -> 0.600 |" in table
    # both rows carry the same probe, and only the second drops the `self` teacher and its source
    assert bench.KEEP_PROBE in bench.ROWS["two"][2] and bench.KEEP_PROBE in bench.ROWS["two_noself"][2]
