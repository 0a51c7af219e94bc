"""Metric paths: address a value, or a per-step / per-layer list of values, in a trial row.

Syntax: dot-separated keys; `key[i]` indexes a list, `key[*]` takes every element, and a bare
`*` takes every value of a mapping (in sorted key order, so results are reproducible).

    metrics.val_loss_final                 -> one value
    curves.steps[*].update_norm            -> one value per logged step
    derived.layers[*].stable_rank          -> one value per adapted matrix
    derived.modules.*.rank                 -> one value per module (sorted by module name)

`resolve` returns (location, value) pairs; the location names the element, so a broken
invariant can be reported as `curves.steps[12].update_norm`.

An invariant compares paths elementwise: `PATH OP PATH` or `PATH OP NUMBER`, clauses joined by
`and`, e.g. `metrics.generation.degenerate_final <= 0 and metrics.retention_loss_increase <= 0.1`.
"""

from __future__ import annotations

import math
import re
from typing import Any

_PART = re.compile(r"\[(\*|\d+)\]")
_SEGMENT = re.compile(r"^(\*|[A-Za-z_][\w-]*)(\[(\*|\d+)\])*$")
INVARIANT_OPS = ("<=", ">=", "==", "<", ">")


class PathMissing(KeyError):
    """The row has no value at this path (e.g. an older trainer that logs no steps)."""


def resolve(row: dict, path: str) -> list[tuple[str, Any]]:
    """Every (location, value) the path selects in `row`; PathMissing if a key is absent."""
    found: list[tuple[str, Any]] = [("", row)]
    for segment in path.split("."):
        key, indices = segment.split("[", 1)[0], _PART.findall(segment)
        found = [hit for loc, node in found for hit in _step(loc, node, key, path)]
        for index in indices:
            found = [hit for loc, node in found for hit in _index(loc, node, index, path)]
    return found


def values(row: dict, path: str) -> list[float]:
    """The selected values as floats (None and non-numbers become NaN)."""
    return [_as_float(v) for _, v in resolve(row, path)]


def scalar(row: dict, path: str) -> float:
    """The one value a path without wildcards selects, as a float (NaN if None)."""
    hits = resolve(row, path)
    if len(hits) != 1:
        raise PathMissing(f"{path}: selects {len(hits)} values, expected one")
    return _as_float(hits[0][1])


def _step(loc: str, node: Any, key: str, path: str) -> list[tuple[str, Any]]:
    if key == "*":
        if not isinstance(node, dict):
            raise PathMissing(f"{path}: '{loc or '.'}' is not a mapping")
        return [(f"{loc}.{k}" if loc else str(k), node[k]) for k in sorted(node, key=str)]
    if not isinstance(node, dict) or key not in node or node[key] is None:
        raise PathMissing(f"{path}: no '{key}' at '{loc or '.'}'")
    return [(f"{loc}.{key}" if loc else key, node[key])]


def _index(loc: str, node: Any, index: str, path: str) -> list[tuple[str, Any]]:
    if not isinstance(node, list):
        raise PathMissing(f"{path}: '{loc}' is not a list")
    if index == "*":
        return [(f"{loc}[{i}]", v) for i, v in enumerate(node)]
    i = int(index)
    if i >= len(node):
        raise PathMissing(f"{path}: '{loc}' has {len(node)} elements, no [{i}]")
    return [(f"{loc}[{i}]", node[i])]


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan if value is None else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_metric_path(path: str) -> bool:
    """Whether `path` follows the syntax above (it may still select nothing in a row)."""
    return all(_SEGMENT.match(seg) for seg in path.split("."))


def invariant_clauses(text: str) -> list[str]:
    """'A <= B and C <= 0' -> ['A <= B', 'C <= 0']: an invariant may be a conjunction, every
    clause checked at every element it selects."""
    return [clause.strip() for clause in re.split(r"\s+and\s+", text.strip())]


def parse_invariant(text: str) -> tuple[str, str, str | float]:
    """'lhs OP rhs' -> (lhs path, op, rhs path or number)."""
    match = re.fullmatch(r"\s*(\S+)\s*(<=|>=|==|<|>)\s*(\S+)\s*", text)
    if not match:
        raise ValueError(f"'{text}' must read 'PATH OP PATH' or 'PATH OP NUMBER' with OP one "
                         f"of {' '.join(INVARIANT_OPS)}")
    lhs, op, rhs = match.groups()
    try:
        rhs_value: str | float = float(rhs)
    except ValueError:
        rhs_value = rhs
    for path in (lhs, rhs_value):
        if isinstance(path, str) and not is_metric_path(path):
            raise ValueError(f"'{path}' is not a metric path")
    return lhs, op, rhs_value
