"""Claims engine: loading, rule hashes, every verdict path on synthetic ledger rows, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from runner.claims import (
    CLAIM_DIR,
    Claim,
    VerdictWord,
    decide,
    load_claim,
    load_claims,
    paths,
)
from runner.errors import ConfigError, HardwareUnavailable

_ids = itertools.count()

PAIRED = {
    "id": "p", "statement": "A beats B", "source": "unit test", "kind": "paired_comparison",
    "arms": [{"name": "a", "trainer": "adamw", "overrides": {"lr": 1.0e-3}},
             {"name": "b", "trainer": "adamw", "overrides": {"lr": 1.0e-4}}],
    "metric": "metrics.val_loss_final", "direction": "lower", "trials": 5, "test": "paired_t",
    "alpha": 0.05, "min_effect": 0.02, "budget": {"max_tokens": 2000},
}


def write_claim(tmp_path: Path, spec: dict, name: str | None = None) -> Path:
    path = tmp_path / f"{name or spec['id']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def claim(tmp_path: Path, **changes) -> Claim:
    spec = {**PAIRED, **changes}
    return load_claim(write_claim(tmp_path, spec))


def row(c: Claim, arm: str, seed: int, value: float | None = None, *, status: str = "ok",
        rule_hash: str | None = None, **extra) -> dict:
    return {
        "run_id": f"r{next(_ids):05d}", "experiment": "unit", "claim_id": c.id,
        "rule_hash": rule_hash or c.rule_hash, "claim_arm": arm, "arm": "adamw", "seed": seed,
        "status": status, "stop_reason": "budget",
        "metrics": {"val_loss_final": value, "val_loss_initial": 3.0}, **extra,
    }


def paired_rows(c: Claim, a: list[float], b: list[float]) -> list[dict]:
    return ([row(c, "a", s, v) for s, v in enumerate(a)]
            + [row(c, "b", s, v) for s, v in enumerate(b)])


BASE = [2.50, 2.61, 2.43, 2.70, 2.55]


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("change, message", [
    ({"alpha": 0.7}, "alpha: must be in (0, 0.5), got 0.7"),
    ({"kind": "anecdote"}, "kind: 'anecdote' is not one of: paired_comparison, correlation, "
                           "invariant, counterexample_search, by_construction"),
    ({"trials": "five"}, "trials: must be an integer, got str 'five'"),
    ({"trials": 2}, "trials: must be >= 3 for a paired comparison (got 2): fewer seeds cannot "
                    "estimate the spread"),
    ({"test": "anova"}, "test: 'anova' is not one of: paired_t, wilcoxon, bootstrap, pearson, "
                        "spearman, none"),
    ({"min_effect": 0.0}, "min_effect: must be > 0: state the smallest effect that matters"),
    ({"budget": {"max_tokenz": 5}}, "budget.max_tokenz: unknown key (valid keys: max_tokens, "
                                    "max_steps, eval_every, eval_examples, eval_batch_size)"),
    ({"metric": "metrics..val"}, "metric: 'metrics..val' is not a metric path (a.b[*].c, a.*.c, "
                                 "a[0])"),
    ({"statement": None}, "statement: missing required value"),
    ({"arms": PAIRED["arms"][:1]}, "arms: a paired comparison needs exactly 2 arms (subject, "
                                   "baseline), got 1"),
    ({"arms": [{"name": "a", "trainer": "adamw"}, {"name": "b", "trainer": "adamw"}]},
     "arms: 'a' and 'b' use the same trainer: give both an override of the same key with "
     "different values so their trials can be told apart"),
])
def test_invalid_claim_fails_with_one_line_naming_file_and_key(tmp_path, change, message):
    path = write_claim(tmp_path, {**PAIRED, **change})
    with pytest.raises(ConfigError) as err:
        load_claim(path)
    assert str(err.value) == f"{path}: {message}"


def test_unknown_key_id_mismatch_and_unknown_check(tmp_path: Path) -> None:
    path = write_claim(tmp_path, {**PAIRED, "aplha": 0.05})
    with pytest.raises(ConfigError, match=r"^.*p\.yaml: aplha: unknown key \(valid keys: "):
        load_claim(path)
    path = write_claim(tmp_path, PAIRED, name="other")
    with pytest.raises(ConfigError) as err:
        load_claim(path)
    assert str(err.value) == f"{path}: id: 'p' must match the file name 'other'"
    spec = {"id": "k", "statement": "s", "source": "s", "kind": "by_construction",
            "check": "nope", "tolerance": 1e-6}
    with pytest.raises(ConfigError, match=r"check: 'nope' is not a registered check \(known: "):
        load_claim(write_claim(tmp_path, spec))


def test_unknown_claim_id_lists_the_known_ones(tmp_path: Path) -> None:
    write_claim(tmp_path, PAIRED)
    with pytest.raises(ConfigError, match=r"claim=nope: no such claim in .* \(known: p\)$"):
        load_claim("nope", tmp_path)


def test_every_registered_claim_loads() -> None:
    claims = load_claims()
    assert {c.id for c in claims} >= {
        "derived_beats_sgd", "derived_matches_tuned_adamw", "derived_beats_prodigy",
        "derived_beats_schedulefree", "stable_rank_predicts_adapter_rank",
        "derived_never_diverges", "mass_within_weyl_bound", "procrustes_cka_in_sample"}
    assert len({c.rule_hash for c in claims}) == len(claims)
    for c in claims:
        assert c.kind.value == "by_construction" or 3 <= c.trials or c.kind.value == "correlation"


# ---------------------------------------------------------------------------------------------
# Rule hash


def test_rule_hash_is_stable_and_ignores_wording(tmp_path: Path) -> None:
    a = claim(tmp_path)
    b = claim(tmp_path, statement="reworded", source="elsewhere", rationale="why")
    assert a.rule_hash == b.rule_hash == load_claim(tmp_path / "p.yaml").rule_hash
    # Golden: changing Claim.rule() orphans every trial in the ledger; do it on purpose only.
    assert load_claim("procrustes_cka_in_sample", CLAIM_DIR).rule_hash.startswith("6cf6e0b20339")


@pytest.mark.parametrize("change", [
    {"alpha": 0.01}, {"min_effect": 0.03}, {"trials": 6}, {"test": "bootstrap"},
    {"sides": 1, "sides_reason": "only an improvement would change what we ship"},
    {"direction": "higher"}, {"metric": "metrics.val_loss_best"}, {"margin": 0.02},
    {"budget": {"max_tokens": 4000}}, {"first_seed": 100},
    {"arms": [{"name": "a", "trainer": "adamw", "overrides": {"lr": 2.0e-3}},
              PAIRED["arms"][1]]},
])
def test_rule_hash_changes_with_every_rule_field(tmp_path: Path, change: dict) -> None:
    assert claim(tmp_path).rule_hash != claim(tmp_path, **change).rule_hash


def test_first_seed_moves_the_seeds_and_zero_keeps_old_hashes(tmp_path: Path) -> None:
    """A confirmatory experiment runs on seeds its choice was not made on; first_seed 0 is the
    rule as it was before the key existed, so registered rules keep their hashes."""
    assert claim(tmp_path, first_seed=100, trials=5).seeds == [100, 101, 102, 103, 104]
    assert claim(tmp_path, first_seed=0).rule_hash == claim(tmp_path).rule_hash
    assert "first_seed" not in claim(tmp_path).rule()
    with pytest.raises(ConfigError, match="first_seed: must be >= 0"):
        claim(tmp_path, first_seed=-1)
    from runner.tasks.claims import with_overrides

    moved = with_overrides(claim(tmp_path), None, {}, first_seed=7)
    assert moved.seeds == [7, 8, 9, 10, 11] and moved.rule_hash != claim(tmp_path).rule_hash


# ---------------------------------------------------------------------------------------------
# Paired comparison


def t_trials_needed(d: np.ndarray, boundary: float, alpha: float = 0.05) -> int:
    """Oracle: the smallest n whose two-sided paired t-test has 80% power (noncentral t)."""
    delta, sd = abs(d.mean() - boundary), d.std(ddof=1)
    for n in range(2, 100_000):
        crit = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = delta * np.sqrt(n) / sd
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= 0.8:
            return n
    raise AssertionError("no n reaches 80% power")


def test_validated_when_significantly_better_than_min_effect(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.VALIDATED
    d = np.array(BASE) - np.array(a)
    oracle = stats.ttest_1samp(d, 0.02)  # scipy directly: two-sided, against min_effect
    assert v.p_value == pytest.approx(oracle.pvalue, rel=1e-12)  # same call, same float
    assert v.effect == pytest.approx(0.0998, abs=1e-9) and v.n == 5 and len(v.trial_ids) == 10
    assert v.ci[0] > 0.02 and v.ci_level == pytest.approx(0.95)
    assert v.deciding_test == "paired t vs mean difference +0.02, two-sided"
    assert v.effect_unit == "nats" and not v.is_check and not v.smoke


def test_no_verdict_before_every_registered_pair_is_in(tmp_path: Path) -> None:
    """4 of 5 pre-registered pairs, all clearly better: INCONCLUSIVE until the fifth is in (no
    optional stopping)."""
    c = claim(tmp_path)  # trials: 5
    a = [b - 0.10 for b in BASE]
    rows = paired_rows(c, a, BASE)
    last_seed_ids = {r["run_id"] for r in rows if r["seed"] == c.seeds[-1]}
    v = decide(c, [r for r in rows if r["run_id"] not in last_seed_ids])
    assert v.verdict is VerdictWord.INCONCLUSIVE and v.n == 4
    assert v.reason == "4 of 5 paired trials in the ledger so far"
    assert decide(c, rows).verdict is VerdictWord.VALIDATED


def test_validated_is_as_strict_as_disproven(tmp_path: Path) -> None:
    # Better by 0.03 > min_effect 0.02 with p(d > 0) tiny, but not significantly above 0.02:
    # a point estimate past the boundary does not validate, as one short of it does not refute.
    c = claim(tmp_path)
    noise = [0.012, -0.012, 0.008, -0.006, -0.002]
    a = [b - 0.03 + e for b, e in zip(BASE, noise, strict=True)]
    d = np.array(BASE) - np.array(a)
    assert stats.ttest_1samp(d, 0.0, alternative="greater").pvalue < 0.01
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.INCONCLUSIVE
    assert v.p_value == pytest.approx(stats.ttest_1samp(d, 0.02).pvalue, rel=1e-12)


def test_disproven_when_significantly_worse(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b + 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.DISPROVEN and "significantly below" in v.reason
    assert v.effect < 0 and v.ci[1] < 0.02


def test_disproven_when_equivalent_within_min_effect(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b - 0.001 + e for b, e in zip(BASE, [0.001, -0.001, 0.0005, 0.0, -0.0004], strict=True)]
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.DISPROVEN and "significantly below" in v.reason
    d = np.array(BASE) - np.array(a)
    assert v.p_value == pytest.approx(stats.ttest_1samp(d, 0.02).pvalue, rel=1e-12)


def test_inconclusive_says_how_many_trials_would_decide(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b - 0.05 + e for b, e in zip(BASE, [0.06, -0.05, 0.04, -0.06, 0.03], strict=True)]
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.INCONCLUSIVE
    d = np.array(BASE) - np.array(a)
    assert v.trials_needed == max(t_trials_needed(d, 0.02), 6)
    assert str(v.trials_needed) in v.reason


def test_margin_claim_validated_when_non_inferior_and_disproven_when_worse(tmp_path):
    c = claim(tmp_path, margin=0.05)
    noise = [0.004, -0.004, 0.002, 0.0, -0.002]
    same = [b + 0.01 + e for b, e in zip(BASE, noise, strict=True)]  # worse by 0.01 < margin
    v = decide(c, paired_rows(c, same, BASE))
    assert v.verdict is VerdictWord.VALIDATED and "matches or beats" in v.reason
    assert v.deciding_test == "paired t vs mean difference -0.05, two-sided"
    worse = [b + 0.2 + e for b, e in zip(BASE, noise, strict=True)]
    v = decide(c, paired_rows(c, worse, BASE))
    assert v.verdict is VerdictWord.DISPROVEN and "non-inferiority margin" in v.reason
    d = np.array(BASE) - np.array(worse)
    assert v.p_value == pytest.approx(stats.ttest_1samp(d, -0.05).pvalue, rel=1e-12)


def test_wilcoxon_and_bootstrap_use_scipy(tmp_path: Path) -> None:
    a = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.002, -0.004], strict=True)]
    why = "only an improvement would change what we ship"
    c = claim(tmp_path, test="wilcoxon", sides=1, sides_reason=why)
    v = decide(c, paired_rows(c, a, BASE))
    d = np.array(BASE) - np.array(a)
    assert v.p_value == stats.wilcoxon(d - 0.02, alternative="greater").pvalue == 1 / 32
    assert v.verdict is VerdictWord.VALIDATED  # exact signed-rank: 1/32 < 0.05 with 5 pairs
    assert v.deciding_test.endswith("one-sided")
    c = claim(tmp_path, test="bootstrap", sides=1, sides_reason=why)
    v = decide(c, paired_rows(c, a, BASE))
    assert v.verdict is VerdictWord.VALIDATED and v.p_value == 0.0
    boot = stats.bootstrap((d,), np.mean, confidence_level=0.9, n_resamples=9999,
                           method="percentile", rng=np.random.default_rng(0))
    assert v.ci == (boot.confidence_interval.low, boot.confidence_interval.high)


@pytest.mark.parametrize("change, message", [
    ({"test": "wilcoxon", "trials": 3},
     "test: wilcoxon with 3 paired trials cannot reach alpha=0.05 (its smallest two-sided p "
     "is 0.25); plan at least 6 trials"),
    ({"test": "wilcoxon", "trials": 5},
     "test: wilcoxon with 5 paired trials cannot reach alpha=0.05 (its smallest two-sided p "
     "is 0.0625); plan at least 6 trials"),
    ({"metric": "metrics.nope"}, "metric: 'metrics.nope': no trial records metrics.nope"),
    ({"metric": "metricz.val_loss_final"}, "metric: 'metricz.val_loss_final': trials record "
                                           "no 'metricz'"),
    ({"sides": 1}, "sides_reason: a one-sided test needs its reason stated (or sides: 2)"),
])
def test_undecidable_rule_is_refused_at_load_time(tmp_path, change, message):
    path = write_claim(tmp_path, {**PAIRED, **change})
    with pytest.raises(ConfigError) as err:
        load_claim(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_a_mixed_configuration_arm_is_refused_not_pooled(tmp_path: Path) -> None:
    from runner.claims.arms import MixedConfiguration

    c = claim(tmp_path)
    a = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    rows = paired_rows(c, a, BASE)
    for r in rows:
        r["config"] = {"trainer": {"name": "adamw", "lr": 1e-3 if r["claim_arm"] == "a" else
                                   1e-4}, "budget": {"max_tokens": 2000}}
        r["config_hash"] = "c" * 64
    assert decide(c, rows).verdict is VerdictWord.VALIDATED
    # A newer row of seed 0 with another budget: the oldest row of the seed would win the
    # pairing, but the arm now mixes two configurations, which is refused.
    stray = row(c, "b", 0, 9.9, config={"trainer": rows[5]["config"]["trainer"],
                                        "budget": {"max_tokens": 4000}}, config_hash="d" * 64)
    with pytest.raises(MixedConfiguration) as err:
        decide(c, [*rows, stray])
    assert "claim p" in str(err.value) and "arm 'b' mixes 2 configurations" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_skipped_when_every_trial_of_an_arm_is_skipped(tmp_path: Path) -> None:
    c = claim(tmp_path)
    rows = [row(c, "a", s, 2.0) for s in range(5)]
    rows += [row(c, "b", s, status="skipped", skip_reason="HardwareUnavailable: no cuda")
             for s in range(5)]
    v = decide(c, rows)
    assert v.verdict is VerdictWord.SKIPPED
    assert v.reason == "arm 'b' could not run here: HardwareUnavailable: no cuda"


def test_verdicts_ignore_rows_of_another_rule_or_claim(tmp_path: Path) -> None:
    c = claim(tmp_path)
    better = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    rows = paired_rows(c, better, BASE)
    worse = [b + 0.5 for b in BASE]
    rows += [row(c, "a", s, v, rule_hash="0" * 64) for s, v in enumerate(worse)]
    rows += [{**r, "claim_id": "other", "run_id": "0" + r["run_id"]}
             for r in paired_rows(c, worse, BASE)]
    v = decide(c, rows)
    assert v.verdict is VerdictWord.VALIDATED and v.n == 5 and len(v.trial_ids) == 10


def test_rows_without_claim_arm_are_matched_by_trainer_overrides(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    rows = paired_rows(c, a, BASE)
    for r in rows:
        lr = 1.0e-3 if r.pop("claim_arm") == "a" else 1.0e-4
        r["config"] = {"trainer": {"name": "adamw", "lr": lr}}
    assert decide(c, rows).verdict is VerdictWord.VALIDATED


# ---------------------------------------------------------------------------------------------
# Correlation, invariant, counterexample search, by construction


CORR = {"id": "r", "statement": "x predicts y", "source": "unit", "kind": "correlation",
        "arms": [{"name": "derived", "trainer": "adamw"}], "x": "derived.layers[*].stable_rank",
        "y": "derived.layers[*].rank", "direction": "negative", "trials": 1,
        "test": "pearson", "alpha": 0.05, "min_effect": 0.7}


def layer_row(c: Claim, x: np.ndarray, y: np.ndarray) -> dict:
    layers = [{"stable_rank": float(a), "rank": float(b)} for a, b in zip(x, y, strict=True)]
    return row(c, "derived", 0, derived={"layers": layers})


def test_correlation_disproven_when_interval_excludes_the_claimed_magnitude(tmp_path):
    # The seed's numbers: r = -0.51 over 92 matrices, claimed |r| >= 0.7.
    c = load_claim(write_claim(tmp_path, CORR))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(92)
    y = -0.51 * x + np.sqrt(1 - 0.51**2) * rng.standard_normal(92)
    v = decide(c, [layer_row(c, x, y)])
    r = stats.pearsonr(x, y)
    z = (np.arctanh(r.statistic) - np.arctanh(-0.7)) * np.sqrt(92 - 3)  # Fisher z vs rho=-0.7
    assert v.effect == pytest.approx(r.statistic)
    assert v.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    ci = r.confidence_interval(0.95)
    assert v.ci == pytest.approx((ci.low, ci.high)) and ci.low > -0.7
    assert v.verdict is VerdictWord.DISPROVEN and v.n == 92 and v.effect_unit == "Pearson r"
    assert v.details["spearman_r"] == pytest.approx(stats.spearmanr(x, y).statistic)


def test_correlation_validated_when_strong_with_the_claimed_sign(tmp_path: Path) -> None:
    c = load_claim(write_claim(tmp_path, {**CORR, "test": "spearman"}))
    x = np.arange(30.0)
    y = -x + np.random.default_rng(1).normal(0, 2, 30)
    v = decide(c, [layer_row(c, x, y)])
    assert v.verdict is VerdictWord.VALIDATED and v.effect < -0.9


INVARIANT = {"id": "w", "statement": "update inside Weyl bound", "source": "unit",
             "kind": "invariant", "arms": [{"name": "derived", "trainer": "adamw"}],
             "invariant": "curves.steps[*].update_norm <= curves.steps[*].weyl_bound",
             "tolerance": 1e-5, "trials": 2}


def steps_row(c: Claim, seed: int, norms: list[float], bound: float = 1.0) -> dict:
    steps = [{"step": i, "update_norm": n, "weyl_bound": bound} for i, n in enumerate(norms)]
    return row(c, "derived", seed, curves={"steps": steps})


def test_invariant_disproven_by_a_single_violation_listing_where(tmp_path: Path) -> None:
    c = load_claim(write_claim(tmp_path, INVARIANT))
    ok = steps_row(c, 0, [0.5, 1.0, 1.000001])  # within the stated float slack
    bad = steps_row(c, 1, [0.5, 0.9, 1.2, 0.3])
    assert decide(c, [ok]).verdict is VerdictWord.INCONCLUSIVE  # 1 of 2 trials, no violation
    v = decide(c, [ok, bad])
    assert v.verdict is VerdictWord.DISPROVEN and v.n == 7
    assert v.details["violations"] == [f"{bad['run_id']} curves.steps[2].update_norm: 1.2 <= 1 "
                                       "fails"]
    assert decide(c, [ok, steps_row(c, 1, [0.2])]).verdict is VerdictWord.VALIDATED


COUNTER = {"id": "n", "statement": "never diverges", "source": "unit",
           "kind": "counterexample_search", "arms": [{"name": "derived", "trainer": "adamw"}],
           "metric": "metrics.val_loss_final", "reference": "metrics.val_loss_initial",
           "direction": "lower", "trials": 3}


def test_counterexample_found_and_not_found(tmp_path: Path) -> None:
    c = load_claim(write_claim(tmp_path, COUNTER))
    good = [row(c, "derived", s, 2.0) for s in range(3)]
    v = decide(c, good)
    assert v.verdict is VerdictWord.VALIDATED and v.reason == "no counterexample in 3 trials searched"
    diverged = row(c, "derived", 1, 2.0, status="diverged", stop_reason="diverged")
    flat = row(c, "derived", 2, 3.5)
    v = decide(c, [good[0], diverged, flat])
    assert v.verdict is VerdictWord.DISPROVEN
    assert v.details["counterexamples"] == [
        f"{diverged['run_id']}: diverged",
        f"{flat['run_id']}: metrics.val_loss_final 3.5 does not improve on "
        "metrics.val_loss_initial 3"]


def test_by_construction_proven_on_the_registered_check(tmp_path: Path) -> None:
    from runner.claims.checks import CHECKS

    c = load_claim("procrustes_cka_in_sample", CLAIM_DIR)
    rows = []
    for seed in c.seeds:
        res = CHECKS[c.check](seed)
        rows.append(row(c, c.check, seed, metrics={"value": res.value, "abs_error":
                                                   res.abs_error}))
    v = decide(c, rows)
    assert v.verdict is VerdictWord.PROVEN and v.effect <= 1e-6 and v.n == 3
    rows[1]["metrics"]["abs_error"] = 0.01  # a broken identity
    assert decide(c, rows).verdict is VerdictWord.DISPROVEN


def test_linear_cka_matches_a_hand_computable_case() -> None:
    from runner.claims.checks import linear_cka

    x = np.random.default_rng(0).standard_normal((20, 5))
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 5)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)  # float64 rounding only
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)  # rotation, scale
    assert linear_cka(x[:, :2], x[:, 2:4]) < 0.5  # independent columns


def test_paths_address_scalars_lists_and_mappings() -> None:
    r = {"metrics": {"v": 1.5}, "derived": {"modules": {"b": {"rank": 2}, "a": {"rank": 1}}},
         "curves": {"steps": [{"u": 1}, {"u": 2}]}}
    assert paths.scalar(r, "metrics.v") == 1.5
    assert paths.values(r, "derived.modules.*.rank") == [1.0, 2.0]  # sorted by key
    assert paths.resolve(r, "curves.steps[1].u") == [("curves.steps[1].u", 2)]
    with pytest.raises(paths.PathMissing):
        paths.resolve(r, "curves.telemetry[*].u")


# ---------------------------------------------------------------------------------------------
# Running claims


def _run_cfg(tmp_path: Path, extra: list[str] = ()):
    from support import compose_config

    from runner.config.load import to_run_config

    return to_run_config(compose_config([
        "model=tiny_llama", "data.max_seq_len=96", "data.max_examples=120",
        "budget.eval_every=2", "budget.eval_examples=4", "verify_adapter=false",
        "hardware.threads=1", "allow_dirty=true",
        f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}", *extra]))


def test_run_claims_resumes_and_writes_each_trial_once(tmp_path: Path, capsys) -> None:
    from runner.tasks.claims import run_claims

    spec = {**COUNTER, "trials": 2, "arms": [{"name": "fast", "trainer": "adamw",
                                              "overrides": {"lr": 1.0e-3}}],
            "budget": {"max_tokens": 300, "max_steps": 2}}
    write_claim(tmp_path, spec)
    cfg = _run_cfg(tmp_path)
    first = run_claims(cfg, ["n"], claim_dir=tmp_path)
    trials = sorted((tmp_path / "results" / "trials").glob("*.json"))
    assert len(trials) == 2 and "arm fast seed 1: done" in capsys.readouterr().out
    second = run_claims(cfg, ["n"], claim_dir=tmp_path)
    assert sorted((tmp_path / "results" / "trials").glob("*.json")) == trials
    assert "claim n arm fast seed 0: reused" in capsys.readouterr().out
    assert first == second and first[0].n == 2
    stored = json.loads(trials[0].read_text())
    assert stored["claim_arm"] == "fast"  # the claim's arm name, not only the trainer's
    # The rule is registered with its setting (arms' trainer options, model, data, budget), so
    # its hash covers them: not the hash of the claim file alone.
    (record,) = (tmp_path / "results" / "rules").glob("n-*.json")
    registered = json.loads(record.read_text())
    assert stored["claim_id"] == "n" and stored["rule_hash"] == registered["rule_hash"]
    assert registered["rule_hash"] != load_claim(tmp_path / "n.yaml").rule_hash
    assert registered["setting"]["arms"]["fast"]["lr"] == 1.0e-3
    assert registered["setting"]["model"]["id"] == "tiny_llama"
    assert registered["setting"]["budget"]["max_tokens"] == 300
    assert registered["setting"]["data_sha256"] == stored["data_sha256"]
    assert stored["git_commit"] == registered["git_commit"]  # read once, when the job starts
    assert stored["cpu_cores"] >= 1 and stored["cpu_model"] and "torch" in stored["blas"]
    assert stored["config"]["budget"]["max_tokens"] == 300  # the claim's budget, every arm
    assert (tmp_path / "results" / "rules").is_dir()


def test_shards_split_the_trials_by_config_and_together_cover_them(tmp_path: Path) -> None:
    """Two jobs with task.shards=2 train disjoint halves (by config hash), each trial once."""
    from runner.tasks.claims import run_claims

    spec = {**COUNTER, "trials": 3, "arms": [{"name": "fast", "trainer": "adamw",
                                              "overrides": {"lr": 1.0e-3}}],
            "budget": {"max_tokens": 200, "max_steps": 1}}
    write_claim(tmp_path, spec)
    trials = tmp_path / "results" / "trials"
    for shard in (0, 1):
        cfg = _run_cfg(tmp_path, ["task.shards=2", f"task.shard={shard}"])
        run_claims(cfg, ["n"], claim_dir=tmp_path)
        rows = [json.loads(p.read_text()) for p in trials.glob("*.json")]
        if shard == 0:
            assert all(int(r["config_hash"], 16) % 2 == 0 for r in rows)
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    with pytest.raises(ConfigError, match="task.shard=2"):
        run_claims(_run_cfg(tmp_path, ["task.shards=2", "task.shard=2"]), ["n"],
                   claim_dir=tmp_path)


def test_unavailable_arm_writes_a_skipped_row(tmp_path: Path, monkeypatch) -> None:
    import runner.tasks.claims as claims_task
    from runner.tasks.claims import run_claims

    def no_device(cfg, **kwargs):
        raise HardwareUnavailable("hardware.device=cuda: no CUDA device")

    monkeypatch.setattr(claims_task, "train_task", no_device)
    write_claim(tmp_path, {**COUNTER, "trials": 2})
    cfg = _run_cfg(tmp_path)
    (v,) = run_claims(cfg, ["n"], claim_dir=tmp_path)
    assert v.verdict is VerdictWord.SKIPPED
    assert "HardwareUnavailable: hardware.device=cuda: no CUDA device" in v.reason
    run_claims(cfg, ["n"], claim_dir=tmp_path)  # retried, still unavailable: no new rows
    rows = list((tmp_path / "results" / "trials").glob("*.json"))
    assert len(rows) == 2
    assert json.loads(rows[0].read_text())["status"] == "skipped"


def test_by_construction_claim_runs_its_check(tmp_path: Path) -> None:
    from runner.tasks.claims import run_claims

    (v,) = run_claims(_run_cfg(tmp_path), ["procrustes_cka_in_sample"])
    assert v.verdict is VerdictWord.PROVEN and v.n == 3


def test_validate_derived_searches_every_seed(tmp_path: Path, capsys) -> None:
    from support import compose_config

    from runner.app import run_job

    verdict = run_job(compose_config([
        "task=validate_derived", "task.trials=2", "model=tiny_llama", "data.max_seq_len=96",
        "allow_dirty=true",
        "data.max_examples=120", "hardware.threads=1", "budget.eval_examples=4",
        "+claim_overrides.budget.max_tokens=1500", "+claim_overrides.budget.eval_every=5",
        "verify_adapter=false",
        f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"]))
    assert verdict.claim_id == "derived_never_diverges" and verdict.n == 2
    assert verdict.verdict in (VerdictWord.VALIDATED, VerdictWord.DISPROVEN)
    assert "validate_derived: " in capsys.readouterr().out
    seeds = {json.loads(p.read_text())["seed"]
             for p in (tmp_path / "results" / "trials").glob("*.json")}
    assert seeds == {0, 1}


def test_claim_overrides_are_validated_like_a_claim_file(tmp_path: Path) -> None:
    """2 seeds cannot make a paired comparison: refused with one line, nothing registered."""
    from runner.errors import ConfigError
    from runner.tasks.claims import run_claims

    cfg = _run_cfg(tmp_path, ["claim_overrides.trials=2"])
    with pytest.raises(ConfigError, match=r"with claim_overrides: trials: must be >= 3"):
        run_claims(cfg, ["derived_beats_sgd"])
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Every empirical kind reaches every verdict (a rule that cannot fail is not a claim)


def _paired_outcomes(tmp_path: Path) -> dict:
    c = claim(tmp_path)
    noise = [0.01, -0.01, 0.005, 0.0, -0.004]
    return {w: decide(c, paired_rows(c, [b + shift + e for b, e in zip(BASE, noise,
                                                                        strict=True)], BASE))
            for w, shift in (("VALIDATED", -0.10), ("DISPROVEN", 0.10), ("INCONCLUSIVE", -0.02))}


def _correlation_outcomes(tmp_path: Path) -> dict:
    c = load_claim(write_claim(tmp_path, CORR))
    rng = np.random.default_rng(3)
    x = rng.standard_normal(60)
    cases = {"VALIDATED": (-0.95, 60), "DISPROVEN": (0.0, 60), "INCONCLUSIVE": (-0.7, 8)}
    out = {}
    for word, (r, n) in cases.items():
        y = r * x[:n] + np.sqrt(1 - r**2) * rng.standard_normal(n)
        out[word] = decide(c, [layer_row(c, x[:n], y)])
    return out


def _invariant_outcomes(tmp_path: Path) -> dict:
    c = load_claim(write_claim(tmp_path, INVARIANT))
    ok = [steps_row(c, s, [0.5, 0.9]) for s in range(2)]
    return {"VALIDATED": decide(c, ok), "INCONCLUSIVE": decide(c, ok[:1]),
            "DISPROVEN": decide(c, [ok[0], steps_row(c, 1, [1.5])])}


def _counterexample_outcomes(tmp_path: Path) -> dict:
    c = load_claim(write_claim(tmp_path, {**COUNTER, "min_effect": 0.5}))
    good = [row(c, "derived", s, 2.0) for s in range(3)]  # initial 3.0: improved by 1.0
    return {"VALIDATED": decide(c, good), "INCONCLUSIVE": decide(c, good[:2]),
            "DISPROVEN": decide(c, [*good[:2], row(c, "derived", 2, 2.8)])}  # by 0.2 < 0.5


@pytest.mark.parametrize("outcomes", [_paired_outcomes, _correlation_outcomes,
                                      _invariant_outcomes, _counterexample_outcomes])
def test_every_empirical_kind_reaches_every_verdict(tmp_path: Path, outcomes) -> None:
    verdicts = outcomes(tmp_path)
    assert {w: v.verdict.value for w, v in verdicts.items()} == {
        "VALIDATED": "VALIDATED", "DISPROVEN": "DISPROVEN", "INCONCLUSIVE": "INCONCLUSIVE"}
    for v in verdicts.values():
        assert not v.is_check and v.deciding_test


def test_implementation_checks_are_marked_and_kept_apart() -> None:
    checks = {c.id for c in load_claims() if c.is_check}
    assert checks == {"mass_within_weyl_bound", "procrustes_cka_in_sample"}
    c = load_claim("mass_within_weyl_bound", CLAIM_DIR)
    ok = [{"run_id": f"w{s}", "experiment": "unit", "claim_id": c.id, "rule_hash": c.rule_hash,
           "claim_arm": "derived", "seed": s, "status": "ok",
           "curves": {"steps": [{"adapter_norm_ratio": 0.4}]}} for s in c.seeds]
    v = decide(c, ok)
    assert v.verdict is VerdictWord.VALIDATED and v.is_check and v.as_dict()["is_check"]


def test_registered_rules_keep_their_hash_and_take_the_current_wording() -> None:
    from runner.claims.schema import claim_from_record

    rules = Path(__file__).resolve().parent.parent / "results" / "rules"
    for path in sorted(rules.glob("*.json")):
        record = json.loads(path.read_text())
        c = claim_from_record(record, str(path))  # raises if the rule no longer hashes
        assert c.rule_hash == record["rule_hash"]
        assert "SEED-SPEC" not in c.source and "seed/000" not in c.source
        assert c.is_check == (c.id in ("mass_within_weyl_bound", "procrustes_cka_in_sample"))


def test_smoke_runs_on_random_init_models_are_labelled(tmp_path: Path) -> None:
    c = claim(tmp_path)
    a = [b - 0.10 + e for b, e in zip(BASE, [0.01, -0.01, 0.005, 0.0, -0.004], strict=True)]
    rows = paired_rows(c, a, BASE)
    for r in rows:
        r["config"] = {"model": {"id": "tiny_llama", "source": "tiny"}}
    assert decide(c, rows).smoke
    for r in rows:
        r["config"] = {"model": {"id": "smollm2_135m", "source": "gguf_package"}}
    assert not decide(c, rows).smoke


def test_no_claim_cites_what_a_reader_cannot_open() -> None:
    for path in sorted(CLAIM_DIR.glob("*.yaml")):
        text = path.read_text()
        assert "SEED-SPEC" not in text and "seed/000" not in text, path.name


def test_thesis_experiment_ends_with_a_summary_and_its_own_pages(tmp_path: Path, capsys) -> None:
    """`make run`'s experiment: one paired claim decided, then a summary naming the verdict,
    each arm's losses and adapters, and pages built beside its own ledger (not in docs/)."""
    from support import compose_config

    from runner.app import run_job

    run_job(compose_config([
        "+experiment=thesis", "model=tiny_llama", "data.max_seq_len=96", "data.max_examples=120",
        "hardware.threads=1", "allow_dirty=true", "budget.eval_examples=4",
        "claim_overrides.budget.max_tokens=300", "+claim_overrides.budget.max_steps=2",
        f"runs_dir={tmp_path / 'runs'}"]))
    out = capsys.readouterr().out
    ledger, docs = tmp_path / "runs" / "thesis" / "ledger", tmp_path / "runs" / "thesis" / "docs"
    rows = [json.loads(p.read_text()) for p in (ledger / "trials").glob("*.json")]
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        (arm, s) for arm in ("derived_matched_mass", "sgd") for s in range(3)]
    verdict = next(line for line in out.splitlines()
                   if line.startswith("derived_matched_mass_beats_sgd: "))
    assert verdict.split(": ")[1].split(" ")[0] in {w.value for w in VerdictWord}
    for arm in ("derived_matched_mass", "sgd"):
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"  {arm}: val loss ")]
        assert "over 3 seed(s)" in line
    assert out.count("    adapters: ") == 2
    assert (docs / "claims.md").exists() and (docs / "experiments" / "thesis.md").exists()
    assert "derived_matched_mass_beats_sgd" in (docs / "claims.md").read_text()


def test_a_confirmation_on_other_seeds_is_the_same_claim_not_a_superseded_one() -> None:
    from dataclasses import replace as _replace

    from runner.claims.schema import CLAIM_DIR, core_rule, load_claims

    claim = next(c for c in load_claims(CLAIM_DIR) if c.id == "derived_matched_mass_beats_sgd")
    moved = _replace(claim, first_seed=100, trials=5)
    assert moved.rule_hash != claim.rule_hash  # the seeds are part of the registered rule
    assert core_rule(moved) == core_rule(claim)  # ... but not of what the claim says
