"""The config tree: every shipped config loads, bad fields fail before anything starts."""

from pathlib import Path

import pytest

from onpolicy.config import (
    KINDED,
    ConfigError,
    ReverseKLLossConfig,
    RunConfig,
    Section,
    apply_overrides,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "deploy/toy-service.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_there_are_shipped_configs():
    assert SHIPPED, "configs/ should hold at least the toy config"


def test_unknown_field_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/toy.yaml", ["optim.lrr=3"])
    assert "optim.lrr" in str(err.value) and "unknown field" in str(err.value)


def test_out_of_range_field_is_named_with_its_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.temperature=-1", "loss.beta=2"])
    msg = str(err.value)
    assert "rollout.temperature" in msg and "-1" in msg
    assert "loss.beta" in msg


def test_overrides_parse_yaml_scalars_and_nest():
    data = apply_overrides({}, ["a.b=3", "a.c=true", "d=null", "e.f=x=y"])
    assert data == {"a": {"b": 3, "c": True}, "d": None, "e": {"f": "x=y"}}


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["rollout.num_workers"])


def test_cross_field_check():
    with pytest.raises(ConfigError, match="teacher.top_k"):
        load_config(None, ["loss.kind=topk_reverse_kl"])


def test_missing_config_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/toy.yaml", ["schedule.steps=7", "optim.lr=0.002"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.schedule.steps == 7


def test_lr_defaults_per_loss_and_an_explicit_lr_wins(tmp_path):
    toy = ROOT / "configs/toy.yaml"  # sets no optim.lr
    assert load_config(toy, ["loss.kind=reverse_kl"]).optim.lr == ReverseKLLossConfig.default_lr == 3e-4
    assert load_config(toy, ["loss.kind=topk_reverse_kl"]).optim.lr == 1e-3
    assert load_config(toy, ["loss.kind=reverse_kl", "optim.lr=0.002"]).optim.lr == 0.002
    # The resolved number is what a dump holds, so a resumed run keeps it whatever the defaults become.
    dump_config(load_config(toy, ["loss.kind=reverse_kl"]), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", ["loss.kind=jsd"]).optim.lr == 3e-4


def test_every_field_is_documented_and_bounded_numbers():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                yield from walk(ann, f"{prefix}{name}.")
                continue
            if name in KINDED and model_cls is RunConfig:  # a union: every member's fields
                for member in set(KINDED[name].members.values()):
                    yield from walk(member, f"{prefix}{name}[{member.__name__}].")
                continue
            yield f"{prefix}{name}", field

    paths = dict(walk(RunConfig))
    assert "loss[GKDLossConfig].lmbda" in paths and "data[DatasetDataConfig].source" in paths  # the walk sees members
    for path, field in paths.items():
        assert field.description, f"{path} has no description"
        if field.annotation in (int, float):
            bounds = [m for m in field.metadata if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")]
            assert bounds, f"{path} has no bounds"
