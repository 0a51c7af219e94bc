"""`make results` (`python -m runner.report`): rebuild the generated documentation from the
ledger alone.

Reads `results/trials/*.json`, the claims' pre-registration records under `results/rules/` and
the bench rows under `results/bench/`, and writes:
- `docs/runs.md` and the README's results section (runs_page);
- the README's claims section, `docs/claims.md` and `results/claims.json` (claims_pages);
- `docs/experiments/<experiment>.md` with figures under `docs/experiments/figures/`
  (experiment_pages);
- `docs/performance.md` with figures under `docs/performance/` (performance_page);
- the recommended reading in the README and `docs/derivations.md` (readings_page).
Output depends only on the ledger's content (sorted, no timestamps, floats rounded, PNGs
without metadata), and a file is only rewritten when its bytes change, so a second run, or a
run on another machine with the same package versions, changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.claims.schema import CLAIM_DIR
from runner.report import claims_pages, experiment_pages
from runner.report.format import write_all
from runner.report.ledger import LedgerError, read_trials, registered_claims
from runner.report.performance_page import build_performance
from runner.report.readings_page import build_readings
from runner.report.runs_page import build_runs

EXPERIMENTS_DIR = "experiments"


def build(results_dir: Path, docs_dir: Path, readme: Path,
          rows: list[dict] | None = None) -> list[Path]:
    """docs/runs.md and the README's results section; return the files that changed."""
    return build_runs(results_dir, docs_dir, readme, rows)


def build_claims(results_dir: Path, docs_dir: Path, readme: Path,
                 claims_json_path: Path | None = None,
                 claim_dir: Path = CLAIM_DIR, rows: list[dict] | None = None) -> list[Path]:
    """The claims tables, docs/claims.md, results/claims.json and the experiment pages; return
    the files that changed. `rows`: the ledger's trials when the caller has read them."""
    rows = read_trials(results_dir) if rows is None else rows
    entries = claims_pages.claim_entries(results_dir, rows, claim_dir)
    experiments = experiment_pages.experiment_rows(rows, registered_claims(results_dir))
    outputs: dict[Path, str | bytes] = {
        docs_dir / "claims.md": claims_pages.claims_page(entries, rows)}
    if claims_json_path is not None:
        outputs[claims_json_path] = claims_pages.claims_json(entries)
    for name, arms in experiments.items():
        page, figs = experiment_pages.experiment_page(name, arms)
        outputs[docs_dir / EXPERIMENTS_DIR / f"{name}.md"] = page
        for fname, png in figs.items():
            outputs[docs_dir / EXPERIMENTS_DIR / experiment_pages.FIG_DIR / fname] = png
    old = readme.read_text() if readme.exists() else ""
    outputs[readme] = claims_pages.replace_block(
        old, claims_pages.readme_block(entries, list(experiments)))
    return write_all(outputs)


def build_all(results_dir: Path, docs_dir: Path, readme: Path,
              claims_json: Path | None = None) -> list[Path]:
    """Every generated document; return the files that changed (or were removed). The ledger
    is read once and every page is built from those rows."""
    rows = read_trials(results_dir)
    changed = build(results_dir, docs_dir, readme, rows)
    changed += [p for p in build_claims(results_dir, docs_dir, readme, claims_json, rows=rows)
                if p not in changed]
    changed += build_performance(results_dir, docs_dir)
    readings = build_readings(results_dir, readme, docs_dir / "derivations.md", rows)
    changed += [p for p in readings if p not in changed]
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results", type=Path)
    parser.add_argument("--docs-dir", default="docs", type=Path)
    parser.add_argument("--readme", default="README.md", type=Path)
    args = parser.parse_args(argv)
    try:
        changed = build_all(args.results_dir, args.docs_dir, args.readme,
                            args.results_dir / "claims.json")
    except LedgerError as err:  # one line naming the file, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print("results: " + (", ".join(map(str, changed)) + " updated" if changed else "up to date"))
