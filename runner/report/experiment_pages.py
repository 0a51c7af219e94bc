"""docs/experiments/<experiment>.md: per-arm tables and figures, one page per experiment.

Figures (under docs/experiments/figures/): mean validation loss with the seeds' band, every
trial's learning curve against tokens (and against seconds where trials record the seconds of
each evaluation), final-loss bars, and spectra when rows carry them. One arm -> colour map per
page (`figures.arm_colours`) serves every figure on it.
"""

from __future__ import annotations

import math
from collections import defaultdict

from runner.claims.schema import Claim
from runner.claims.verdicts import arm_of, hardware_of, scope_of
from runner.report import figures
from runner.report.claims_pages import RANDOM_INIT_SOURCES
from runner.report.format import mean_sd, table

FIG_DIR = "figures"
SECONDS_KEYS = ("seconds", "train_seconds", "elapsed_seconds")  # per evaluation, when recorded


def _arm_label(row: dict, claims: list[Claim]) -> str:
    if row.get("claim_arm"):
        return str(row["claim_arm"])
    for c in claims:
        if c.id == row.get("claim_id") and c.rule_hash == row.get("rule_hash"):
            arm = arm_of(row, c)
            if arm is not None:
                return arm.name
    return str(row.get("arm"))


def experiment_rows(rows: list[dict], claims: list[Claim]) -> dict[str, dict[str, list[dict]]]:
    """experiment -> arm label -> trials (one per seed and config; checks and copies left out)."""
    out: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    kept = [r for r in sorted(rows, key=lambda r: r["run_id"])
            if not r.get("shared_from") and r.get("arm") != "check"]
    hardware: dict[str, set[str]] = defaultdict(set)
    for r in kept:
        hardware[scope_of(r)].add(hardware_of(r))
    for r in kept:
        key = (r.get("seed"), r.get("config_hash"))
        label = _arm_label(r, claims)
        if len(hardware[scope_of(r)]) > 1:  # an experiment swept over hardware: arm per hardware
            label = f"{label} @ {hardware_of(r)}"
        out[scope_of(r)][label].setdefault(key, r)
    return {x: {a: list(t.values()) for a, t in sorted(arms.items())}
            for x, arms in sorted(out.items())}


def _metric(rows: list[dict], key: str) -> list[float]:
    return [v for r in rows for v in [(r.get("metrics") or {}).get(key)]
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def arm_table(arms: dict[str, list[dict]]) -> str:
    head = ["arm", "trainer", "trials", "ok / diverged / skipped", "tokens", "val initial",
            "val final (mean ± sd)", "val best", "retention final", "tok/s", "tuning tokens"]
    rows = []
    for arm, trials in arms.items():
        status = [sum(r.get("status") == s for r in trials) for s in ("ok", "diverged", "skipped")]
        rows.append([arm, str(trials[0].get("arm")), str(len(trials)),
                     " / ".join(map(str, status)), mean_sd(_metric(trials, "tokens"), 0),
                     *(mean_sd(_metric(trials, k)) for k in
                       ("val_loss_initial", "val_loss_final", "val_loss_best",
                        "retention_loss_final")),
                     mean_sd(_metric(trials, "tokens_per_second"), 0),
                     mean_sd(_metric(trials, "tuning_tokens"), 0)])
    return table(head, rows)


def _seconds(evals: list[dict]) -> list[float] | None:
    for key in SECONDS_KEYS:
        if all(isinstance(e.get(key), (int, float)) for e in evals):
            return [float(e[key]) for e in evals]
    return None


def curves_of(rows: list[dict]) -> list[figures.Curve]:
    """The validation curve of every trial that recorded one (`curves.eval`)."""
    out = []
    for r in rows:
        evals = (r.get("curves") or {}).get("eval") or []
        if evals:
            out.append(figures.Curve([e.get("tokens", 0) for e in evals],
                                     [e.get("val_loss", math.nan) for e in evals],
                                     _seconds(evals)))
    return out


def _spectra(rows: list[dict]) -> dict[str, list[float]] | None:
    """Per-matrix singular values from a derived row: `derived.layers[*].singular_values`
    (named by `module` or `name`) or `derived.spectra` {name: values}."""
    for r in rows:
        derived = r.get("derived") or {}
        if isinstance(derived, dict) and isinstance(derived.get("spectra"), dict):
            return {str(k): v for k, v in derived["spectra"].items() if isinstance(v, list)}
        layers = derived.get("layers") if isinstance(derived, dict) else None
        if isinstance(layers, list):
            found = {str(layer.get("module") or layer.get("name") or i): layer["singular_values"]
                     for i, layer in enumerate(layers)
                     if isinstance(layer, dict) and isinstance(layer.get("singular_values"),
                                                               list)}
            if found:
                return found
    return None


def _is_smoke(rows: list[dict]) -> bool:
    return bool(rows) and all(
        ((r.get("config") or {}).get("model") or {}).get("source") in RANDOM_INIT_SOURCES
        for r in rows)


def _curve_sections(name: str, curves: dict[str, list[figures.Curve]],
                    colours: dict[str, str], figs: dict[str, bytes]) -> list[str]:
    figs[f"{name}-val_loss.png"] = figures.loss_curves(curves, f"{name}: validation loss",
                                                       colours)
    figs[f"{name}-learning_curves.png"] = figures.learning_curves(
        curves, f"{name}: learning curves", colours)
    timed = any(c.seconds is not None for seeds in curves.values() for c in seeds)
    when = ("against training tokens (left) and training seconds (right)" if timed else
            "against training tokens (these trials do not record the seconds of each "
            "evaluation, so there is no panel against seconds)")
    return ["## Validation loss", "",
            "Mean over seeds, band = min–max across seeds, at the mean token count of each "
            "evaluation.", "", f"![validation loss]({FIG_DIR}/{name}-val_loss.png)", "",
            "## Learning curves", "", f"Every trial's validation loss {when}.", "",
            f"![learning curves]({FIG_DIR}/{name}-learning_curves.png)", ""]


def experiment_page(name: str, arms: dict[str, list[dict]]) -> tuple[str, dict[str, bytes]]:
    """The page's markdown and its figures {file name: PNG bytes}."""
    ran = {a: [r for r in rows if r.get("status") != "skipped"] for a, rows in arms.items()}
    all_rows = [r for rows in arms.values() for r in rows]
    colours = figures.arm_colours(arms)
    models = sorted({str(r.get("model_id")) for r in all_rows})
    data = sorted({str(r.get("data_id")) for r in all_rows})
    figs: dict[str, bytes] = {}
    parts = [f"# Experiment `{name}`", "",
             "Generated by `make results` from `results/` alone; do not edit.", "",
             f"Model: {', '.join(models)}; data: {', '.join(data)}; "
             f"{len(all_rows)} trials over {len(arms)} arms.", ""]
    if _is_smoke(all_rows):
        parts += ["**Smoke run**: the model has random weights, so these trials show that the "
                  "pipeline runs end to end; they are not evidence about the method, and their "
                  "verdicts are kept out of the headline Totals.", ""]
    parts += [arm_table(arms), ""]
    curves = {a: c for a, rows in ran.items() for c in [curves_of(rows)] if c}
    if curves:
        parts += _curve_sections(name, curves, colours, figs)
    finals = {a: [v for v in _metric(rows, "val_loss_final") if math.isfinite(v)]
              for a, rows in ran.items()}
    finals = {a: v for a, v in finals.items() if v}
    if finals:
        figs[f"{name}-final_val_loss.png"] = figures.final_loss_bars(
            finals, f"{name}: final validation loss", colours)
        parts += ["## Final validation loss by arm", "",
                  "Bar = mean, error bar = ±1 sd, dots = seeds.", "",
                  f"![final validation loss]({FIG_DIR}/{name}-final_val_loss.png)", ""]
    spectra = next((s for a, rows in sorted(ran.items()) if a.startswith("derived")
                    for s in [_spectra(rows)] if s), None)
    if spectra:
        figs[f"{name}-spectra.png"] = figures.spectra(spectra, f"{name}: weight spectra")
        parts += ["## Spectra of the adapted matrices", "",
                  f"![spectra]({FIG_DIR}/{name}-spectra.png)", ""]
    return "\n".join(parts).rstrip("\n") + "\n", figs
