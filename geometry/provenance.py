"""The provenance record every derived hyperparameter is reported with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Derived:
    """One derived value with the formula, inputs and citation that produced it.

    ``value`` is a float, int, tuple (per-layer values, in layer order), str (e.g. "removed")
    or bool; ``inputs`` maps input names to the numbers or labels used.
    """

    name: str
    value: float | int | tuple | str | bool
    formula: str
    inputs: dict[str, float | int | str] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists, non-finite floats become strings)."""
        return {
            "name": self.name,
            "value": jsonable(self.value),
            "formula": self.formula,
            "inputs": {k: jsonable(v) for k, v in self.inputs.items()},
            "source": self.source,
        }


def jsonable(v: Any) -> Any:
    """Convert tuples/dicts/non-finite floats into strict-JSON-friendly values."""
    if isinstance(v, bool) or v is None or isinstance(v, str | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, tuple | list):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return float(v)
