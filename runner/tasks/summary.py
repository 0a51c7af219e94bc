"""The short summary a claims job ends with: each verdict, the arms' numbers behind it, where
the adapters and the pages are.

`make run` ends with it: a newcomer sees the thesis decided (verdict, both losses, tokens and
seconds per arm) without opening the ledger. With `task.docs_dir` set, the job first builds the
pages of its ledger there (the same generator as `make results`), so the summary can point at
them; the committed docs are only ever rebuilt by `make results`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from runner.claims import Verdict
from runner.config.schema import RunConfig
from runner.ledger import read_trials
from runner.report.cli import build_all


def build_pages(results_dir: str, docs_dir: str) -> list[Path]:
    """The ledger's pages (claims, experiments with figures, runs) under docs_dir."""
    docs = Path(docs_dir)
    return build_all(Path(results_dir), docs, docs / "README.md", Path(results_dir) / "claims.json")


def summary_lines(cfg: RunConfig, verdicts: list[Verdict]) -> list[str]:
    """Lines for each verdict: the words, then one line per arm (mean ± sd of the decided
    metric over its trials, tokens, training seconds) and the arm's adapter folders."""
    rows = {r["run_id"]: r for r in read_trials(cfg.results_dir) if "run_id" in r}
    lines = []
    for v in verdicts:
        effect = "" if v.effect is None else f", effect {v.effect:.4g}"
        p = "" if v.p_value is None else f", p = {v.p_value:.3g}"
        lines.append(f"{v.claim_id}: {v.verdict.value} (n = {v.n}{effect}{p})")
        by_arm: dict[str, list[dict]] = {}
        for run_id in v.trial_ids:
            row = rows.get(run_id)
            if row is not None:
                by_arm.setdefault(row.get("arm", "?"), []).append(row)
        for arm, arm_rows in sorted(by_arm.items()):
            ran = [r for r in arm_rows if r.get("status") != "skipped"]
            if not ran:
                lines.append(f"  {arm}: skipped ({arm_rows[0].get('skip_reason', 'no reason')})")
                continue
            if not any("val_loss_final" in (r.get("metrics") or {}) for r in ran):
                lines.append(f"  {arm}: {len(ran)} measured trial(s), no training")
                continue
            lines.append("  " + _arm_line(arm, ran))
            adapters = sorted(r["adapter_path"] for r in ran if r.get("adapter_path"))
            if adapters:
                lines.append(f"    adapters: {adapters[0]}"
                             + (f" (+{len(adapters) - 1} more)" if len(adapters) > 1 else ""))
    return lines


def _arm_line(arm: str, rows: list[dict]) -> str:
    def values(key: str) -> list[float]:
        return [float(r["metrics"][key]) for r in rows
                if isinstance(r.get("metrics", {}).get(key), (int, float))]

    def mean_sd(xs: list[float], fmt: str) -> str:
        if not xs:
            return "-"
        sd = f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else ""
        return f"{statistics.fmean(xs):{fmt}}{sd}"

    start, final = values("val_loss_initial"), values("val_loss_final")
    return (f"{arm}: val loss {mean_sd(start, '.4f')} -> {mean_sd(final, '.4f')} over "
            f"{len(rows)} seed(s), {mean_sd(values('tokens'), ',.0f')} tokens, "
            f"{mean_sd(values('train_seconds'), '.0f')} s training")
