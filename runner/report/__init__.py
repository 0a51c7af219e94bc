"""`make results`: the generated documentation, rebuilt from the ledger alone.

- `cli`: the command (`python -m runner.report`) and `build_all`, which runs every page;
- `ledger`: reading trial rows, bench rows and registered rules (a corrupt file: one line);
- `runs_page`: docs/runs.md and the README's results section;
- `claims_pages`: the README's claims section, docs/claims.md, results/claims.json;
- `experiment_pages`: docs/experiments/<experiment>.md;
- `performance_page`: docs/performance.md from the bench rows;
- `figures`: byte-stable PNGs with one colour per arm;
- `format`: the one set of number, table, rounding and write-if-changed helpers.
"""

from runner.report.cli import build, build_all, build_claims, main

__all__ = ["build", "build_all", "build_claims", "main"]
