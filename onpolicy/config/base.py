"""What every config section shares: unknown fields are errors, assignments are validated, path fields are
marked; and `Kinds`, the view of a section that is a union of members discriminated on one field."""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def path_marker(kind: Literal["models", "data", "data_or_hub", "output"]) -> dict[str, str]:
    """Marks a field that names a file or folder; `kind` is the server root it must lie under when a REST client
    sets it (`data_or_hub`: a data file, or a hub id where the operator allows them). The control API confines
    every marked field (services/control/core.py); tests/test_security_paths.py fails on an unmarked one."""
    return {"path": kind}


@dataclass(frozen=True)
class Kinds:
    """A section of the run config that is a union of members, one per kind (`teacher.kind`, `loss.kind`,
    `data.task`): which member each kind is and which fields it takes. Everything that lists the kinds (the
    CLI's choices, the control API's schema, error messages) reads them from here, never restates them."""

    section: str  # e.g. "loss"
    field: str  # the discriminator, e.g. "kind"
    members: dict[str, type[Section]]  # kind -> member class, in the union's order
    default: str  # the kind a section without the discriminator gets

    @classmethod
    def of(cls, section: str, union: Any, default: str) -> Kinds:
        """The kinds of `union`, an `Annotated[A | B, Field(discriminator=...)]`."""
        members_union, info = typing.get_args(union)
        field = info.discriminator
        members: dict[str, type[Section]] = {}
        for member in typing.get_args(members_union):
            for kind in typing.get_args(member.model_fields[field].annotation):
                members[kind] = member
        if default not in members:
            raise ValueError(f"{section}: default kind {default!r} is not a member of the union")
        return cls(section, field, members, default)

    def fields(self, kind: str) -> set[str]:
        return set(self.members[kind].model_fields)

    def owners(self, name: str) -> list[str]:
        """The kinds that take field `name`."""
        return [kind for kind, member in self.members.items() if name in member.model_fields]

    def keep_applicable(self, section: dict[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
        """`section` without the fields its kind does not take (those in `keep` stay, to be refused by name)."""
        kind = section.get(self.field, self.default)
        if kind not in self.members:
            return section  # validation names the unknown kind
        allowed = self.fields(kind) | set(keep)
        return {k: v for k, v in section.items() if k in allowed}

    def not_applicable(self, kind: str, name: str) -> str:
        """Why field `name` is refused for `kind`, and the fix."""
        where, owners = f"{self.section}.{self.field}", self.owners(name)
        if owners:
            return (f"{self.section}.{name} applies to {where}={' or '.join(owners)}, not {kind}: remove it, or set "
                    f"{where}")
        takes = ", ".join(sorted(self.fields(kind) - {self.field}))
        return f"unknown field (check the spelling); {where}={kind} takes: {takes}"
