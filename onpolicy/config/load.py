"""Reading a config: YAML plus `key.sub=value` overrides, and errors that name the field and the fix.

Changing a section's kind on the command line (`teacher.kind=service` over a YAML that sets
`teacher.model`) follows one rule: the file's fields that the new kind does not take are dropped, as
the file was written for another kind; a field given on the command line that the new kind does not
take is an error naming the kinds it belongs to, as the user asked for something that would be ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from onpolicy.config.base import Kinds
from onpolicy.config.run import KINDED, RunConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (["a", "b"], 3). Values are parsed as YAML scalars (numbers, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` with each override set; a section whose kind they change keeps only the fields the new kind takes
    and those the overrides name (module docstring)."""
    kinds_before = {name: _kind_of(data.get(name), kinds) for name, kinds in KINDED.items()}
    named: dict[str, set[str]] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
        named.setdefault(path[0], set()).add(path[1] if len(path) > 1 else "")
    for name, kinds in KINDED.items():
        section = data.get(name)
        if isinstance(section, dict) and _kind_of(section, kinds) != kinds_before[name]:
            data[name] = kinds.keep_applicable(section, keep=named.get(name, set()))
    return data


def _kind_of(section: Any, kinds: Kinds) -> Any:
    return section.get(kinds.field, kinds.default) if isinstance(section, dict) else kinds.default


def drop_inapplicable(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each kinded section's fields that its kind does not take removed: for configs stored before
    the sections were unions (every field of every kind, the unused ones at their defaults)."""
    return {name: KINDED[name].keep_applicable(v) if name in KINDED and isinstance(v, dict) else v
            for name, v in data.items()}


def config_error_items(err: ValidationError) -> list[dict[str, Any]]:
    """Each config error as {path (e.g. `rollout.max_new_tokens`), loc, msg, type, input}: the one wording
    the CLI and the control API both show. In a kinded section the member's tag is left out of the path
    (`loss.beta`, not `loss.reverse_kl.beta`) and the message says which kinds take the field."""
    out = []
    for e in err.errors():
        loc, msg, kind = [str(p) for p in e["loc"]], e["msg"], None
        kinds = KINDED.get(loc[0]) if loc else None
        if kinds is not None and len(loc) > 1 and loc[1] in kinds.members:
            kind = loc.pop(1)
        if kinds is not None and e["type"] == "union_tag_invalid":
            loc, e = [loc[0], kinds.field], {**e, "input": e["ctx"]["tag"]}
            msg = f"must be one of {', '.join(kinds.members)}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/ for valid keys)"
            if kinds is not None and kind is not None and len(loc) == 2:
                msg = kinds.not_applicable(kind, loc[1])
        elif kinds is not None and kind is not None and e["type"] == "missing" and len(loc) == 2:
            msg = f"{loc[0]}.{loc[1]} is required when {loc[0]}.{kinds.field}={kind}"
        unknown = e["type"] == "extra_forbidden"
        out.append({
            "path": ".".join(loc) or "(top level)",
            "loc": loc,
            "msg": msg,
            "type": e["type"],
            "input": None if unknown else e.get("input"),
        })
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in config_error_items(err):
        got = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {e['input']!r})"
        lines.append(f"  {e['path']}: {e['msg']}{got}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        source = str(p)
    return config_from_dict(apply_overrides(data, list(overrides or [])), source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
