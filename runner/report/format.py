"""The one set of helpers every generated page uses: numbers, tables, rounding, writing.

Generated files must come out byte-identical on any machine with the same package versions.
Floats are therefore rounded before they are written (a sum taken in another order differs in
its last bits: 0.061583160105640015 on one machine is 0.06158316010564003 on another), and a
file is only rewritten when its bytes change, so a second `make results` changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DASH = "–"  # an empty cell: no value, or not applicable
SIGNIFICANT = 6  # digits kept for floats in machine-readable output (results/claims.json)


# ---------------------------------------------------------------------------------------------
# Numbers


def round_sig(x: float, digits: int = SIGNIFICANT) -> float:
    """`x` rounded to `digits` significant digits (non-finite values unchanged)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def round_floats(obj: Any, digits: int = SIGNIFICANT) -> Any:
    """A copy of a JSON-like structure with every float rounded (`round_sig`); tuples become
    lists, as `json.dumps` writes them."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return round_sig(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    if hasattr(obj, "item"):  # a numpy scalar
        return round_floats(obj.item(), digits)
    return obj


def num(value: Any, digits: int = 4) -> str:
    """A table cell: `digits` decimals with thousands separators (none from 10,000 on); tiny
    non-zero values in scientific notation (so 2e-16 does not read as 0.0000); – for None or
    NaN."""
    if value is None or isinstance(value, bool):
        return DASH if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return DASH
        if value != 0 and abs(value) < 10.0 ** -digits:
            return f"{value:.1e}"
        return f"{value:,.{digits if abs(value) < 1e4 else 0}f}"
    return str(value)


def p_value(p: float | None) -> str:
    return DASH if p is None else f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def mean_sd(values: Sequence[float], digits: int = 4) -> str:
    """`mean ± sd` (sample sd; 0 for one value) of the finite values, – when there are none."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return DASH
    mean = math.fsum(vals) / len(vals)
    sd = (math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
          if len(vals) > 1 else 0.0)
    return f"{mean:,.{digits}f} ± {sd:,.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Markdown


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells that are not strings go through `num`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else num(c) for c in r) + " |"
              for r in rows]
    return "\n".join(lines)


def replace_between(text: str, begin: str, end: str, body: str, after: str | None = None) -> str:
    """`text` with `body` between the markers `begin` and `end`. Markers not yet in the text
    are added after the marker `after` when present, else at the end."""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if after and after in text:
        head, tail = text.split(after, 1)
        return head + after + "\n\n" + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


# ---------------------------------------------------------------------------------------------
# Files


def write_if_changed(path: Path, data: str | bytes) -> bool:
    """Write `data` to `path` unless the file already holds exactly these bytes."""
    raw = data.encode() if isinstance(data, str) else data
    if path.exists() and path.read_bytes() == raw:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return True


def write_all(outputs: dict[Path, str | bytes]) -> list[Path]:
    """Write every output that changed; return those paths, in the given order."""
    return [p for p, data in outputs.items() if write_if_changed(p, data)]
