"""The recommended reading is computed from the ledger: ranking, provisional vs recommended,
shared trials counted once, and the block written between its markers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.claims.verdicts import VerdictWord
from runner.derived.step import READINGS
from runner.report.readings_page import (
    BEGIN,
    CURVES,
    END,
    FAIR,
    SEEDS,
    build_readings,
    confirmation,
    curves_paragraph,
    fair_matrix,
    long_run_orderings,
    long_runs,
    readings_block,
    step_size_evidence,
)


def row(arm: str, seed: int, loss: float, experiment: str = FAIR, **extra) -> dict:
    return {"run_id": f"{arm}-{seed}-{extra.get('shared_from', '')}", "experiment": experiment,
            "arm": arm, "claim_arm": arm, "seed": seed, "status": "ok",
            "config_hash": f"{arm}{seed}", "metrics": {"val_loss_final": loss, "tokens": 16000,
                                                      "train_seconds": 100.0}, **extra}


def test_best_reading_is_provisional_until_every_reading_has_all_seeds() -> None:
    rows = [row("derived_matched_mass", s, 3.30 + 0.01 * s) for s in range(SEEDS)]
    rows += [row("derived", s, 3.48) for s in range(SEEDS)]
    rows += [row("sgd", s, 3.45) for s in range(SEEDS)]
    rows += [row("adamw_grid", s, 2.95) for s in range(SEEDS)]
    text = readings_block(rows)
    assert "**Provisionally best reading: `derived_matched_mass`**" in text
    assert "+0.1600 nats over 5 common seed(s) against the next reading (`derived`)" in text
    assert "+0.1300 nats over 5 common seed(s) against plain SGD" in text
    assert "-0.3700 nats over 5 common seed(s) against the best other baseline (`adamw_grid`)" \
        in text
    assert "`derived_uniform` has 0 of 5 seeds" in text
    complete = rows + [row(r, s, 3.5) for r in READINGS
                       if r not in ("derived", "derived_matched_mass") for s in range(SEEDS)]
    text = readings_block(complete)
    assert "**Recommended reading: `derived_matched_mass`**" in text and "Provisional" not in text


def test_a_diverged_seed_ranks_last_and_margins_use_common_seeds() -> None:
    rows = [row("derived_uniform", s, 3.0) for s in range(3)] + [row("derived_uniform", 3,
                                                                      float("nan"))]
    rows += [row("derived_tail_start", s, 3.4) for s in range(4)]
    rows += [row("sgd", s, 3.5) for s in (2, 3, 4)]
    text = readings_block(rows)
    assert "**Provisionally best reading: `derived_tail_start`**" in text
    assert "(1 diverged)" in text
    assert "+0.1000 nats over 2 common seed(s) against plain SGD" in text  # seeds 2 and 3


def test_a_shared_trial_counts_once_and_other_experiments_not_at_all() -> None:
    rows = [row("derived_uniform", 0, 3.5), row("derived_uniform", 0, 3.5, shared_from="x"),
            row("derived_uniform", 1, 3.0, experiment="smollm2_claims")]
    assert "| `derived_uniform` | reading | 1 | 3.5000 ± 0.0000 |" in readings_block(rows)


def test_no_fair_trials_says_so() -> None:
    assert "no reading is recommended" in readings_block([row("derived", 0, 3.0, "quickstart")])


def test_block_goes_between_markers_in_readme_and_derivations(tmp_path: Path) -> None:
    (tmp_path / "trials").mkdir()
    r = row("derived_tail_start", 0, 3.4)
    (tmp_path / "trials" / "a.json").write_text(json.dumps(r))
    readme, derivations = tmp_path / "README.md", tmp_path / "derivations.md"
    for path in (readme, derivations):
        path.write_text(f"intro\n{BEGIN}\nold\n{END}\nrest\n")
    assert set(build_readings(tmp_path, readme, derivations)) == {readme, derivations}
    assert "(docs/claims.md)" in readme.read_text() and "old" not in readme.read_text()
    assert "(claims.md)" in derivations.read_text()
    assert build_readings(tmp_path, readme, derivations) == []  # byte-stable


def test_the_confirmation_quotes_its_verdict_and_every_arms_loss(tmp_path: Path) -> None:
    rows = [row("sgd", s, 3.42, experiment="smollm2_confirm") for s in (100, 101)]
    rows += [row("derived_matched_mass", s, 3.20, experiment="smollm2_confirm")
             for s in (100, 101)]
    verdict = {"experiment": "smollm2_confirm", "verdict": "VALIDATED", "n": 2,
               "reason": "derived_matched_mass better than sgd by 0.22"}
    other = {**verdict, "experiment": FAIR, "verdict": "DISPROVEN"}
    text = confirmation(rows, [other, verdict])
    assert text.startswith("**VALIDATED**: derived_matched_mass better than sgd by 0.22 (n = 2)")
    assert "DISPROVEN" not in text
    assert "`derived_matched_mass` 3.2000 ± 0.0000 (2 seeds), `sgd` 3.4200" in text
    assert confirmation(rows, []).startswith("no verdict yet")
    assert confirmation([row("sgd", 0, 3.4)], [verdict]) == "not run yet."
    # build_readings reads the verdicts from the claims ledger, leaving superseded ones out
    (tmp_path / "trials").mkdir()
    for i, r in enumerate([*rows, row("derived", 0, 3.4)]):
        (tmp_path / "trials" / f"{i}.json").write_text(json.dumps(r))
    (tmp_path / "claims.json").write_text(json.dumps(
        [{"verdict": verdict, "superseded": False},
         {"verdict": {**verdict, "verdict": "INCONCLUSIVE"}, "superseded": True}]))
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    build_readings(tmp_path, readme, tmp_path / "absent.md")
    assert "**VALIDATED**" in readme.read_text() and "INCONCLUSIVE" not in readme.read_text()


def test_make_run_and_the_confirmation_name_the_ledgers_reading_once_it_is_decided() -> None:
    """thesis.yaml (make run), smollm2_confirm.yaml and the bench name one reading; once the
    fair test is complete it must be the one the ledger recommends."""
    import yaml

    from runner.report.readings_page import recommendation
    from runner.tasks.bench_summary import RECOMMENDED

    root = Path(__file__).resolve().parents[1]
    best, decided = recommendation(
        [json.loads(p.read_text()) for p in (root / "results" / "trials").glob("*.json")])
    named = {yaml.safe_load((root / "conf" / "experiment" / f"{x}.yaml").read_text())[
        "defaults"][2]["override /trainer"] for x in ("thesis", "smollm2_confirm")}
    assert named == {RECOMMENDED}
    if decided:
        assert best == RECOMMENDED, f"the ledger recommends {best}: update thesis/confirm/bench"


def curve_row(arm: str, points: list[tuple[int, float]], run: str = "", **extra) -> dict:
    return {"run_id": f"long-{arm}{run}", "experiment": CURVES, "arm": arm, "seed": 0,
            "status": "ok", "stop_reason": "budget", "metrics": {"val_loss_final": points[-1][1]},
            "curves": {"eval": [{"tokens": t, "val_loss": v} for t, v in points]}, **extra}


def test_long_runs_say_when_the_ordering_changes_past_the_fair_budget() -> None:
    # At 16,000 tokens (interpolated between 8,000 and 24,000) a = 3.0 < b = 3.1; at the end
    # b = 2.5 < a = 2.9: the page must say the ordering changes.
    rows = [curve_row("a", [(0, 3.5), (8000, 3.2), (24000, 2.8), (140000, 2.9)]),
            curve_row("b", [(0, 3.5), (8000, 3.3), (24000, 2.9), (140000, 2.5)])]
    runs, _ = long_runs(rows)
    assert runs["a"].at_fair == pytest.approx(3.0) and runs["b"].at_fair == pytest.approx(3.1)
    assert long_run_orderings(runs) == (["a", "b"], ["b", "a"], 140000)
    text = "\n".join(curves_paragraph(rows))
    assert "**Within the long runs, the ordering still changes past 16,000 tokens**" in text
    held = [curve_row("a", [(0, 3.5), (20000, 3.0), (140000, 2.4)]),
            curve_row("b", [(0, 3.5), (20000, 3.2), (140000, 2.6)])]
    assert "the ordering at 16,000 tokens holds to 140,000 tokens" in "\n".join(
        curves_paragraph(held))


def test_long_runs_compare_on_common_tokens_and_leave_out_diverged_and_short_runs() -> None:
    # b stopped at 60,000 tokens: a and b are compared there (a 2.9 < b 3.0), not a at 140,000.
    rows = [curve_row("a", [(0, 3.5), (20000, 3.2), (60000, 2.9), (140000, 1.0)]),
            curve_row("b", [(0, 3.5), (20000, 3.1), (60000, 3.0)], stop_reason="certificate"),
            curve_row("c", [(0, 3.5), (20000, 2.0), (30000, 1.5)], diverged_at=31),
            curve_row("d", [(0, 3.5), (9000, 3.4)], stop_reason="certificate")]
    runs, _ = long_runs(rows)
    assert runs["c"].diverged and not runs["b"].diverged
    assert long_run_orderings(runs) == (["b", "a"], ["a", "b"], 60000)
    text = "\n".join(curves_paragraph(rows))
    assert "`d` stopped before 16,000 tokens, 3.4000 at 9,000 (certificate)" in text
    assert "`c` 2.3000 at 16,000 tokens, 1.5000 at 30,000 (diverged)" in text
    assert "at 60,000 tokens (the shortest run's end) `a` < `b`" in text
    only_short = [curve_row("d", [(0, 3.5), (9000, 3.4)], stop_reason="certificate")]
    text = "\n".join(curves_paragraph(only_short))
    assert "not in the ledger" not in text and "stopped before 16,000 tokens" in text


def test_a_rerun_replaces_the_earlier_long_run_and_baselines_carry_their_lr() -> None:
    first = curve_row("adamw", [(0, 3.5), (20000, 3.0)], run="1",
                      config={"trainer": {"lr": 1e-3}})
    second = curve_row("adamw", [(0, 3.5), (20000, 3.3)], run="2",
                       config={"trainer": {"lr": 1e-3}})
    other = curve_row("adamw", [(0, 3.5), (20000, 3.4)], run="3",
                      config={"trainer": {"lr": 3e-4}})
    runs, count = long_runs([first, second, other])
    assert set(runs) == {"adamw (lr 0.001)", "adamw (lr 0.0003)"}
    assert runs["adamw (lr 0.001)"].final == 3.3 and count["adamw (lr 0.001)"] == 2
    assert "newest of 2 runs" in "\n".join(curves_paragraph([first, second, other]))


def _mass_run(experiment: str, n: int, step: float, run: str, seed: int = 0,
              ceiling: int = 3, sps: int = 0) -> dict:
    steps = [{"delta_step_median": step, "bound_ceiling": ceiling, "bound_sps": sps,
              "bound_weyl": 0}] * 2
    return {"run_id": run, "experiment": experiment, "arm": "derived_matched_mass", "seed": seed,
            "status": "ok", "hyperparameters": {"matched_steps": n},
            "metrics": {"val_loss_final": 3.0},
            "curves": {"steps": steps, "eval": [{"tokens": 0, "val_loss": 3.5},
                                                {"tokens": 20000, "val_loss": 3.0}]}}


def test_the_long_runs_show_why_the_matched_reading_slows_from_its_telemetry() -> None:
    # N 16x larger: a step 4x smaller is what the ceiling's 1/sqrt(N) predicts; the fair run of
    # the long run's seed is the one compared, not another seed's.
    rows = [_mass_run(CURVES, 320, 0.01, "long"),
            _mass_run("smollm2_fair", 20, 0.04, "fair-s0", ceiling=2, sps=1),
            _mass_run("smollm2_fair", 20, 0.5, "fair-s1", seed=1)]
    text = "\n".join(curves_paragraph(rows))
    assert "320 in its long run against 20 in the fair test (seed 0)" in text
    assert "100.0% of its per-matrix steps in the long run and 66.7% in the fair test" in text
    assert "was 0.01 against 0.04, 4.00× smaller (√(N ratio) = 4.00)" in text
    assert "The long run takes smaller steps from its first" in text
    assert "Why" not in "\n".join(curves_paragraph(rows[:1]))  # no fair run: nothing to compare
    # A long run whose first step is larger does not get the conclusion; a row without bound
    # counts or with a zero step is left out instead of giving nan or dividing by zero.
    larger = [_mass_run(CURVES, 320, 0.08, "long"), rows[1]]
    text = "\n".join(curves_paragraph(larger))
    assert "2.00× larger" in text and "does not explain" in text and "smaller steps" not in text
    no_bounds = _mass_run(CURVES, 320, 0.01, "long2", ceiling=0)
    zero = _mass_run(CURVES, 320, 0.0, "long3")
    skipped = {**_mass_run(CURVES, 320, 0.01, "long4"), "status": "skipped"}
    assert step_size_evidence([no_bounds, zero, skipped, rows[1]]) == []


def test_the_side_by_side_matrix_shows_each_pair_verdict_or_not_run() -> None:
    def entry(subject, baseline, experiment, n, effect, word, margin=None, **flags):
        claim = SimpleNamespace(arms=(SimpleNamespace(name=subject),
                                      SimpleNamespace(name=baseline)), trials=5, margin=margin)
        return SimpleNamespace(claim=claim, verdict=SimpleNamespace(
            experiment=experiment, n=n, effect=effect, verdict=word), **flags)

    entries = [
        entry("derived_matched_mass", "sgd", FAIR, 5, 0.1382, VerdictWord.VALIDATED),
        # a superseded rule of the same pair must not overwrite the current verdict
        entry("derived_matched_mass", "sgd", FAIR, 5, -1.0, VerdictWord.DISPROVEN,
              superseded=True),
        entry("derived_matched_mass", "adamw_grid", FAIR, 5, -0.4, VerdictWord.DISPROVEN,
              margin=0.02),
        entry("derived", "sgd", FAIR, 2, None, VerdictWord.INCONCLUSIVE),
        entry("derived", "muon", "smollm2_claims", 5, -0.5, VerdictWord.DISPROVEN),
    ]
    rows = [row("derived_matched_mass", s, 3.32) for s in range(SEEDS)]
    rows += [row("sgd", s, 3.46) for s in range(SEEDS)]
    rows += [row("derived_uniform", s, 3.5106) for s in range(SEEDS)]
    for r in rows:
        r["metrics"]["val_loss_initial"] = 3.5107
    text = fair_matrix(entries, rows)
    line = next(x for x in text.splitlines() if x.startswith("| `derived_matched_mass`"))
    assert line.split(" | ")[1:4] == [
        "**VALIDATED** +0.138", "**DISPROVEN** -0.400 (non-inferiority, margin 0.02)",
        "_not run_"]
    line = next(x for x in text.splitlines() if x.startswith("| `derived` "))
    assert line.split(" | ")[1] == "**INCONCLUSIVE** (2 of 5 pairs)"
    assert line.rstrip(" |").endswith("_not run_")  # the other experiment's verdict is not shown
    assert "vs `sgd` (3.4600 ± 0.0000, 5 seeds)" in text
    assert "`derived_uniform` (3.5106 ± 0.0000, 5 seeds, did not train" in text
    assert "`derived_matched_mass` (3.3200 ± 0.0000, 5 seeds)" in text
