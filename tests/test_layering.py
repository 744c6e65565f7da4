"""The architecture as checked rules: the import layering (import-linter contracts in pyproject.toml),
one registry per concept, and the places where a rule may be written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layering_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_loss_registry_and_config_agree():
    from onpolicy.config import LOSS_KINDS, ConfigError, load_config
    from onpolicy.learner.objectives import OBJECTIVES

    assert set(LOSS_KINDS.members) == set(OBJECTIVES)
    for name, objective in OBJECTIVES.items():
        # The config refuses a loss that needs the teacher's top-k when no top-k is asked for.
        try:
            load_config(None, [f"loss.kind={name}", "teacher.top_k=0"])
            refused = False
        except ConfigError:
            refused = True
        assert refused == objective.needs_topk, name


def test_teacher_kind_is_branched_on_only_in_the_factory():
    hits = []
    for path in [*ROOT.joinpath("onpolicy").rglob("*.py"), *ROOT.joinpath("services").rglob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ("tc.kind ==" in line or "teacher.kind ==" in line or "kind == \"local\"" in line
                    or "kind in (\"service\"" in line):
                hits.append(f"{path.relative_to(ROOT)}:{n}")
    assert hits and all(h.startswith("onpolicy/teacher/factory.py:") for h in hits), hits


def test_one_run_status_vocabulary():
    from onpolicy.status import ACTIVE, RESUMABLE, TERMINAL, RunStatus
    from services.control.schemas import RunView

    assert ACTIVE.isdisjoint(TERMINAL) and RESUMABLE <= TERMINAL
    assert RunStatus.RUNNING == "running" and "running" in ACTIVE and RunStatus.RUNNING in ACTIVE
    assert RunView.model_fields["status"].annotation is RunStatus
