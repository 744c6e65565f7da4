"""The `teacher`, `loss` and `data` sections as unions by kind: each kind takes only its fields, a command line
may change a kind, and every list of kinds (CLI, control API, loss registry) is read from the unions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from onpolicy.config import (
    DATA_KINDS,
    LOSS_KINDS,
    REMOTE_DIALECTS,
    TEACHER_KINDS,
    ConfigError,
    Dialect,
    JsonlDataConfig,
    LocalTeacherConfig,
    RemoteTeacherConfig,
    ReverseKLLossConfig,
    config_from_dict,
    drop_inapplicable,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs/toy.yaml"  # a local teacher (model, backend), loss.kind=topk_reverse_kl, data.task=addition


def _error(*overrides: str, path: Path | None = TOY) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value)


@pytest.mark.parametrize("override,says", [
    ("loss.beta=0.3", "loss.beta applies to loss.kind=jsd or gkd, not topk_reverse_kl"),
    ("loss.kl_coef=2", "loss.kl_coef applies to loss.kind=reverse_kl, not topk_reverse_kl"),
    ("teacher.url=http://t:1", "teacher.url applies to teacher.kind=service or vllm or sglang or openai, not local"),
    ("data.chat_template=t.jinja", "data.chat_template applies to data.task=dataset, not addition"),
    ("data.prompts_path=p.jsonl", "data.prompts_path applies to data.task=jsonl, not addition"),
])
def test_a_field_of_another_kind_is_refused_naming_its_kinds(override, says):
    msg = _error(override)
    assert says in msg, msg
    assert f"  {override.split('=')[0]}: " in msg  # the path has no member tag in it (not loss.topk_reverse_kl.beta)


def test_a_misspelt_field_lists_what_the_kind_takes():
    msg = _error("loss.normalise=token")
    assert "loss.normalise: unknown field" in msg and "loss.kind=topk_reverse_kl takes: hidden, mask_truncated, normalize" in msg


def test_an_unknown_kind_lists_the_kinds():
    msg = _error("loss.kind=forward_kl")
    assert "loss.kind: must be one of " + ", ".join(LOSS_KINDS.members) in msg and "'forward_kl'" in msg
    assert "teacher.kind: must be one of local, " + ", ".join(REMOTE_DIALECTS) in _error("teacher.kind=triton")


def test_a_field_a_kind_requires_is_named_with_the_kind():
    assert "data.prompts_path: data.prompts_path is required when data.task=jsonl" in _error("data.task=jsonl")
    assert "data.source is required when data.task=dataset" in _error("data.task=dataset")


def test_changing_a_kind_on_the_command_line_drops_the_files_fields_of_the_old_kind():
    # The README's command: toy.yaml sets teacher.model and teacher.backend, which a remote teacher lacks.
    cfg = load_config(TOY, ["teacher.kind=service", "teacher.url=http://127.0.0.1:8100"])
    assert isinstance(cfg.teacher, RemoteTeacherConfig) and cfg.teacher.endpoints() == ["http://127.0.0.1:8100"]
    assert cfg.teacher.top_k == 16  # a field both kinds take is kept
    cfg = load_config(TOY, ["data.task=jsonl", "data.prompts_path=p.jsonl"])
    assert isinstance(cfg.data, JsonlDataConfig) and cfg.data.skip_long_prompts is False


def test_a_command_line_field_the_new_kind_lacks_is_an_error_whatever_its_place():
    for overrides in (["teacher.kind=service", "teacher.url=http://t:1", "teacher.backend=vllm"],
                      ["teacher.backend=vllm", "teacher.kind=service", "teacher.url=http://t:1"]):
        assert "teacher.backend applies to teacher.kind=local or self, not service" in _error(*overrides)


def test_without_a_kind_change_a_files_field_of_another_kind_is_an_error(tmp_path):
    data = yaml.safe_load(TOY.read_text())
    data["teacher"] = {"kind": "service", "url": "http://t:1", "model": "toy/teacher"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert "teacher.model applies to teacher.kind=local, not service" in _error(path=tmp_path / "c.yaml")
    # the same file with the kind set to what it already is drops nothing either
    assert "teacher.model applies to" in _error("teacher.kind=service", path=tmp_path / "c.yaml")


def test_a_dumped_config_changes_loss_kind_and_keeps_its_resolved_lr(tmp_path):
    dump_config(load_config(TOY, ["loss.kind=reverse_kl", "loss.kl_coef=2"]), tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["loss"] == {
        "normalize": "token", "mask_truncated": False, "kind": "reverse_kl", "kl_coef": 2.0, "baseline": "whiten",
        "gamma": 0.0, "ratio_max": 10.0, "hidden": None}  # only the kind's own fields are written
    cfg = load_config(tmp_path / "c.yaml", ["loss.kind=gkd", "loss.lmbda=0.25"])
    assert cfg.loss.kind == "gkd" and cfg.loss.lmbda == 0.25 and cfg.optim.lr == ReverseKLLossConfig.default_lr


def test_a_section_without_its_kind_is_of_the_default_kind():
    cfg = config_from_dict({"teacher": {"model": "m", "top_k": 4}, "loss": {"kl_coef": 2}, "data": {"max_digits": 2}})
    assert isinstance(cfg.teacher, LocalTeacherConfig) and cfg.teacher.model == "m"
    assert cfg.loss.kind == "reverse_kl" and cfg.loss.kl_coef == 2 and cfg.data.task == "addition"
    assert (TEACHER_KINDS.default, LOSS_KINDS.default, DATA_KINDS.default) == ("local", "reverse_kl", "addition")


def test_a_config_stored_with_every_kinds_fields_still_loads():
    """The control plane's database holds configs written when each section had every kind's fields."""
    stored = {"teacher": {"kind": "service", "url": "http://t:1", "model": "toy/teacher", "backend": "hf",
                          "dtype": "float32", "top_k": 0},
              "loss": {"kind": "reverse_kl", "beta": 0.5, "lmbda": 0.5, "temperature": 2.0, "kl_coef": 1.5},
              "data": {"task": "addition", "prompts_path": None, "source": None, "chat_template": None}}
    with pytest.raises(ConfigError, match="teacher.model applies to"):
        config_from_dict(stored)
    cfg = config_from_dict(drop_inapplicable(stored))
    assert cfg.teacher.endpoints() == ["http://t:1"] and cfg.loss.kl_coef == 1.5 and cfg.data.task == "addition"


def test_each_loss_carries_its_lr_topk_need_and_sampler_into_the_run_and_the_registry():
    from onpolicy.learner.objectives import OBJECTIVES

    assert list(OBJECTIVES) and set(OBJECTIVES) == set(LOSS_KINDS.members)
    for kind, member in LOSS_KINDS.members.items():
        objective = OBJECTIVES[kind]
        assert (objective.needs_topk, objective.samples) == (member.needs_topk, member.samples), kind
        assert load_config(None, [f"loss.kind={kind}", "teacher.top_k=4"]).optim.lr == member.default_lr
    assert [k for k, m in LOSS_KINDS.members.items() if not m.needs_topk] == ["reverse_kl", "sft"]
    assert {k: m.samples for k, m in LOSS_KINDS.members.items() if m.samples != "student"} == {
        "gkd": "mixed", "sft": "teacher", "soft_targets": "teacher"}


def test_cli_and_control_api_kind_lists_are_the_configs(monkeypatch):
    from onpolicy.cli import build_parser
    from onpolicy.teacher.clients.remote import RemoteTeacher
    from onpolicy.teacher.factory import REMOTE_KINDS
    from services.control.schemas import AttachTeacher

    # besides the dialects: a managed teacher, a text-only endpoint and the frozen starting student (own fields)
    assert list(TEACHER_KINDS.members) == ["local", *REMOTE_DIALECTS, "managed", "openai", "self"]
    assert list(REMOTE_KINDS) == list(REMOTE_DIALECTS)
    assert all(issubclass(cls, RemoteTeacher) for cls in REMOTE_KINDS.values())
    assert AttachTeacher.model_json_schema()["properties"]["kind"]["enum"] == list(REMOTE_DIALECTS)
    # The CLI reads the table when it checks or shows a choice: a row added to it is a choice at once.
    monkeypatch.setitem(REMOTE_DIALECTS, "throwaway", Dialect("x:Y", "a dialect of this test"))
    parser = build_parser()
    for argv in (["teacher", "check", "http://t:1", "--student", "s"], ["teachers", "attach", "http://t:1"]):
        assert parser.parse_args([*argv, "--kind", "throwaway"]).kind == "throwaway"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--kind", "nope"])


def test_no_module_restates_a_kind_list():
    """Kinds are listed once, in their union; a second list (a tuple of dialects in a CLI, a set of losses that
    need no top-k) is the drift this layout removed."""
    lists = {"teacher": list(REMOTE_DIALECTS), "loss": list(LOSS_KINDS.members), "data": list(DATA_KINDS.members)}
    offenders = []
    for path in [*ROOT.joinpath("onpolicy").rglob("*.py"), *ROOT.joinpath("services").rglob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for section, kinds in lists.items():
                if path == ROOT / "onpolicy/config" / f"{section}.py":  # where the union is defined
                    continue
                if len({k for k in kinds if re.search(rf"[\"']{k}[\"']", line)}) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{n} ({section} kinds)")
    assert not offenders, offenders


def _copy_package(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "assets")
    for name in ("onpolicy", "services"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r}"
    path.write_text(text.replace(old, new))


def test_a_new_dialect_and_a_new_loss_are_one_file_and_one_registration_each(tmp_path):
    """The README's checklists, done on a copy of the package: a teacher dialect is its adapter file plus a row
    in REMOTE_DIALECTS; a loss is its config member plus its registered function. Nothing else is edited, and
    the config, the factory, both CLIs, the control API's schema and the loss registry all know them."""
    _copy_package(tmp_path)
    pkg = tmp_path / "onpolicy"
    (pkg / "teacher/echo.py").write_text(textwrap.dedent('''
        from onpolicy.teacher.clients.service import ServiceTeacher

        class EchoTeacher(ServiceTeacher):
            """Our service's protocol under another name."""
    '''))
    _edit(pkg / "config/teacher.py", '    "sglang": Dialect(',
          '    "echo": Dialect("onpolicy.teacher.echo:EchoTeacher", "a test dialect"),\n    "sglang": Dialect(')
    _edit(pkg / "config/loss.py", "\n\nLossConfig = Annotated[\n    ReverseKLLossConfig", textwrap.dedent('''


        class HalfSFTLossConfig(SFTLossConfig):
            default_lr: ClassVar[float] = 5e-4
            kind: Literal["half_sft"] = Field("half_sft", description="`half_sft`: half of sft.")
            weight: float = Field(0.5, ge=0.0, le=1.0, description="The half.")


        LossConfig = Annotated[
            HalfSFTLossConfig | ReverseKLLossConfig'''))
    with (pkg / "learner/objectives.py").open("a") as f:
        f.write(textwrap.dedent('''

            @register_objective("half_sft")
            def _half_sft(x, cfg, normalizer):
                loss, metrics = _sft(x, cfg, normalizer)
                return cfg.weight * loss, metrics
        '''))
    probe = f"TOY = {str(TOY)!r}\n" + textwrap.dedent('''
        from onpolicy.cli import build_parser
        from onpolicy.config import load_config
        from onpolicy.learner.objectives import OBJECTIVES
        from onpolicy.teacher.echo import EchoTeacher
        from onpolicy.teacher.factory import open_teacher
        from services.control.schemas import AttachTeacher

        cfg = load_config(TOY, ["teacher.kind=echo", "teacher.url=http://127.0.0.1:9", "teacher.top_k=0",
                                "loss.kind=half_sft", "loss.weight=0.25"])
        teacher = open_teacher(cfg.teacher)  # no top-k asked: nothing is sent to the URL
        assert type(teacher) is EchoTeacher, type(teacher)
        teacher.close()
        assert cfg.optim.lr == 5e-4 and cfg.loss.weight == 0.25
        assert OBJECTIVES["half_sft"].samples == "teacher" and not OBJECTIVES["half_sft"].needs_topk
        assert "echo" in AttachTeacher.model_json_schema()["properties"]["kind"]["enum"]
        assert build_parser().parse_args(["teacher", "check", "http://t:1", "--student", "s", "--kind", "echo"])
        print("ok")
    ''')
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr[-3000:]
