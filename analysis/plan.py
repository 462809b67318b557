"""The Plan: which components to transplant, at what strength α, and where the choice came from.

A plan round-trips through YAML. Components may be written as ids, ``{id: alpha}`` pairs or full
entries; the default strength applies to entries without their own::

    alpha: 1.0
    components:
      - L3.mlp
      - L5.H2: 0.5
      - {id: L7.attn.o, alpha: 0.25, score: 3.1}
    provenance: {method: attribution, task: demo:arith}
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis.errors import GraftError, validation_problem


class PlanItem(BaseModel):
    """One component of the plan; ``alpha`` None means the plan's default strength."""

    model_config = ConfigDict(extra="forbid")
    id: str
    alpha: float | None = Field(None, allow_inf_nan=False)
    score: float | None = None


class Provenance(BaseModel):
    """Where a plan came from: method, task, sources and their hashes."""

    model_config = ConfigDict(extra="allow")
    method: str | None = None
    task: str | None = None
    donor: str | None = None
    target: str | None = None
    donor_sha256: dict[str, str] = Field(default_factory=dict)
    target_sha256: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    graftlm: str | None = None


class Plan(BaseModel):
    """Components with strengths; ``alpha`` is the default strength."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, allow_inf_nan=False)
    components: list[PlanItem]
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("components", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """Accept ``- L3.mlp`` and ``- L3.mlp: 0.5`` beside full entries."""
        if not isinstance(value, list):
            return value
        items = []
        for entry in value:
            if isinstance(entry, str):
                items.append({"id": entry})
            elif isinstance(entry, dict) and len(entry) == 1 and "id" not in entry:
                ((cid, alpha),) = entry.items()
                items.append({"id": str(cid), "alpha": alpha})
            else:
                items.append(entry)
        return items

    @classmethod
    def of(cls, ids: list[str], alpha: float = 1.0, **provenance: Any) -> Plan:
        return cls(alpha=alpha, components=[PlanItem(id=i) for i in ids], provenance=Provenance(**provenance))

    def strengths(self) -> dict[str, float]:
        """Component id → α (a repeated id keeps its last strength)."""
        return {item.id: self.alpha if item.alpha is None else item.alpha for item in self.components}

    def with_alpha(self, alpha: float) -> Plan:
        """The same components, every one at strength ``alpha``."""
        items = [item.model_copy(update={"alpha": None}) for item in self.components]
        return self.model_copy(update={"alpha": alpha, "components": items})

    def with_hashes(self, donor_sha: dict[str, str], target_sha: dict[str, str]) -> Plan:
        """The same plan with the sources' sha256 (file name → digest) in its provenance."""
        provenance = self.provenance.model_copy(update={"donor_sha256": donor_sha, "target_sha256": target_sha})
        return self.model_copy(update={"provenance": provenance})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        data["components"] = [item["id"] if set(item) == {"id"} else item for item in data["components"]]
        if not data["provenance"].get("donor_sha256"):
            data["provenance"].pop("donor_sha256", None)
        if not data["provenance"].get("target_sha256"):
            data["provenance"].pop("target_sha256", None)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        from analysis.io.files import write_file

        return write_file(path, self.to_yaml())

    @classmethod
    def from_yaml(cls, text: str, source: str = "<plan>") -> Plan:
        from analysis.io.files import parse_yaml

        data = parse_yaml(text, source, "fix the plan file")
        if not isinstance(data, dict):
            raise GraftError(f"{source}: a plan is a mapping with a 'components' list",
                             "see the example at the top of analysis/plan.py")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise GraftError(f"{source}: {validation_problem(err, cls)}", "fix the plan file") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from analysis.io.files import read_text

        path = Path(path)
        if not path.is_file():
            raise GraftError(f"no such plan file: {path}", "check the path")
        return cls.from_yaml(read_text(path, "plan file"), str(path))


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
