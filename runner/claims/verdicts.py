"""Verdicts from ledger rows: one function per claim kind, the words of DESIGN.md §5.

`decide(claim, rows)` looks only at rows with the claim's id *and* rule hash (so a rule
changed after the fact starts from zero), refuses rows of one arm that ran under different
configurations (MixedConfiguration: never pooled, never hidden behind the oldest row of a
seed), assigns each row to an arm, and applies the rule:

- paired_comparison (d > 0 means the subject arm is better; runner.claims.stats): one test of
  the boundary b (the smallest effect that matters, or minus the non-inferiority margin)
  decides both ways: VALIDATED if it rejects centre(d) = b with the estimate above b,
  DISPROVEN if it rejects with the estimate below, INCONCLUSIVE otherwise, with the paired
  trials that would decide (noncentral t, power 0.8)
- correlation: the same on Fisher's z scale, with b the claimed r (sign x min_effect)
- invariant: DISPROVEN on a single violation (listed), VALIDATED when all `trials` seeds hold
- counterexample_search: DISPROVEN if any trial diverged, failed to improve (by `min_effect`
  when set), or broke the invariant; VALIDATED after `trials` trials with none
- by_construction: PROVEN if |value - expected| <= tolerance on every check row
- SKIPPED when every trial of an arm was skipped here (the reasons are recorded)

Every verdict names its deciding test and the unit of its effect, says whether it is an
implementation check (a statement that holds by construction: reported apart from the claims)
and whether it comes from a smoke run on a random-init model (kept out of the headline totals).

An experiment run on several hardware names (`-m ... hardware=cpu,mlx`) gets one verdict per
(claim, hardware): trials of different hardware have different config hashes and are never
pooled. By-construction checks do not depend on the hardware (they run in numpy): one verdict.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from runner.claims import paths
from runner.claims.arms import (
    arm_of,
    check_one_configuration,
    deciding_test,
    effect_unit,
    is_smoke,
)
from runner.claims.claim import Claim, Direction, Kind
from runner.claims.stats import PairedTest, correlation


class VerdictWord(StrEnum):
    VALIDATED = "VALIDATED"
    DISPROVEN = "DISPROVEN"
    INCONCLUSIVE = "INCONCLUSIVE"
    PROVEN = "PROVEN"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class Verdict:
    claim_id: str
    rule_hash: str
    kind: str
    verdict: VerdictWord
    reason: str  # one sentence a reader can check against the numbers
    experiment: str | None = None
    effect: float | None = None  # metric units (r for correlations); > 0 favours the claim
    ci: tuple[float, float] | None = None
    ci_level: float | None = None
    p_value: float | None = None
    n: int = 0  # paired trials / layers / steps checked / checks
    trial_ids: tuple[str, ...] = ()
    trials_needed: int | None = None  # INCONCLUSIVE: total trials the power estimate asks for
    details: dict[str, Any] = field(default_factory=dict)
    hardware: str | None = None  # set when the experiment's trials span several hardware names
    # How the report shows it: the test that decided the verdict (e.g. "paired t, two-sided"),
    # the unit of `effect` ("nats", "Pearson r", ...), whether the row is an implementation
    # check (holds by construction; kept out of the verdict totals) and whether it comes from a
    # smoke run on a random-init model (kept out of the headline totals).
    deciding_test: str | None = None
    effect_unit: str | None = None
    is_check: bool = False
    smoke: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.hardware is None:  # single-hardware verdicts keep their original shape
            del out["hardware"]
        for key in ("deciding_test", "effect_unit", "is_check", "smoke"):
            if not out[key]:  # absent until set, so older claim tables keep their shape
                del out[key]
        out["verdict"] = self.verdict.value
        out["ci"] = list(self.ci) if self.ci else None
        out["trial_ids"] = list(self.trial_ids)
        return out


# ---------------------------------------------------------------------------------------------
# Selecting and assigning rows


def claim_rows(claim: Claim, rows: Iterable[dict]) -> list[dict]:
    """The rows this claim's current rule asked for (same claim id and rule hash)."""
    rh = claim.rule_hash
    return [r for r in rows if r.get("claim_id") == claim.id and r.get("rule_hash") == rh]


def rows_by_arm(claim: Claim, rows: list[dict]) -> dict[str, dict[int, dict]]:
    """arm name -> seed -> row (the first by run id if a seed was run twice)."""
    out: dict[str, dict[int, dict]] = {a.name: {} for a in claim.arms}
    for row in sorted(rows, key=lambda r: r["run_id"]):
        arm = arm_of(row, claim)
        if arm is not None and row.get("seed") in claim.seeds:
            out[arm.name].setdefault(row["seed"], row)
    return out


def scope_of(row: dict) -> str:
    return str(row.get("experiment") or "adhoc")


def hardware_of(row: dict) -> str:
    return str(row.get("hardware") or "")


def split_by_hardware(claim: Claim, rows: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """[(hardware, rows)] of one experiment's rows: one group per hardware name when they span
    several (by-construction checks: always one group), else [(None, rows)]."""
    names = sorted({hardware_of(r) for r in rows})
    if claim.kind is Kind.by_construction or len(names) <= 1:
        return [(None, rows)]
    return [(name, [r for r in rows if hardware_of(r) == name]) for name in names]


def decide_all(claim: Claim, rows: Iterable[dict]) -> list[Verdict]:
    """One verdict per experiment in which the claim's trials ran, and per hardware where an
    experiment's trials span several (by construction: one per experiment)."""
    mine = claim_rows(claim, rows)
    scopes = sorted({scope_of(r) for r in mine})
    if not scopes:
        return [decide(claim, [])]
    return [decide(claim, part, hardware=hw)
            for scope in scopes
            for hw, part in split_by_hardware(claim, [r for r in mine if scope_of(r) == scope])]


def decide_on(claim: Claim, rows: Iterable[dict], hardware: str) -> Verdict:
    """The verdict of `claim` on one hardware name, from one experiment's rows."""
    for hw, part in split_by_hardware(claim, claim_rows(claim, rows)):
        if hw is None or hw == hardware:
            return decide(claim, part, hardware=hw)
    return decide(claim, [], hardware=hardware)


def decide(claim: Claim, rows: Iterable[dict], *, hardware: str | None = None) -> Verdict:
    """The verdict of `claim` from ledger rows (rows of other claims or rules are ignored).

    `hardware` only labels the verdict: the caller picks the rows (`split_by_hardware`).
    """
    mine = claim_rows(claim, rows)
    experiments = sorted({scope_of(r) for r in mine})
    if claim.kind is not Kind.by_construction:
        check_one_configuration(claim, _ran(mine))
    base = {"claim_id": claim.id, "rule_hash": claim.rule_hash, "kind": claim.kind.value,
            "experiment": ", ".join(experiments) or None, "hardware": hardware,
            "is_check": claim.is_check, "smoke": is_smoke(claim, mine),
            "deciding_test": deciding_test(claim), "effect_unit": effect_unit(claim)}
    if claim.kind is Kind.by_construction and mine and not _ran(mine):
        reasons = sorted({str(r.get("skip_reason") or "no reason recorded") for r in mine})
        return Verdict(verdict=VerdictWord.SKIPPED, trial_ids=_ids(mine),
                       reason=f"every check was skipped here: {'; '.join(reasons)}", **base)
    if claim.kind is not Kind.by_construction:
        skipped = _skipped_arm(claim, mine)
        if skipped is not None:
            return Verdict(verdict=VerdictWord.SKIPPED, reason=skipped,
                           trial_ids=_ids(mine), **base)
    rule = {
        Kind.paired_comparison: _paired,
        Kind.correlation: _correlation,
        Kind.invariant: _invariant,
        Kind.counterexample_search: _counterexample,
        Kind.by_construction: _by_construction,
    }[claim.kind]
    return Verdict(**base, **rule(claim, mine))


def _ids(rows: Iterable[dict]) -> tuple[str, ...]:
    return tuple(sorted(r["run_id"] for r in rows))


def _ran(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") != "skipped"]


def _skipped_arm(claim: Claim, rows: list[dict]) -> str | None:
    by_arm = rows_by_arm(claim, rows)
    for arm in claim.arms:
        arm_rows = list(by_arm[arm.name].values())
        if arm_rows and all(r.get("status") == "skipped" for r in arm_rows):
            reasons = sorted({str(r.get("skip_reason") or "no reason recorded")
                              for r in arm_rows})
            return f"arm '{arm.name}' could not run here: {'; '.join(reasons)}"
    return None


def _not_run(claim: Claim, have: int, what: str = "trials") -> dict[str, Any]:
    return {"verdict": VerdictWord.INCONCLUSIVE, "n": have, "trials_needed": claim.trials,
            "reason": f"{have} of {claim.trials} {what} in the ledger so far"}


# ---------------------------------------------------------------------------------------------
# Paired comparison


def _paired(claim: Claim, rows: list[dict]) -> dict[str, Any]:
    subject, baseline = claim.arms
    by_arm = rows_by_arm(claim, _ran(rows))
    pairs, notes = [], []
    for seed in claim.seeds:
        a, b = by_arm[subject.name].get(seed), by_arm[baseline.name].get(seed)
        if a is None or b is None:
            continue
        va, vb = _metric(a, claim.metric), _metric(b, claim.metric)
        if not (math.isfinite(va) and math.isfinite(vb)):
            notes.append(f"seed {seed} excluded: non-finite {claim.metric}")
            continue
        pairs.append((seed, va, vb, a["run_id"], b["run_id"]))
    ids = tuple(sorted(i for p in pairs for i in p[3:]))
    # The rule fixes the number of seeds: no verdict before every pair is in (a test repeated as
    # trials arrive, stopping at the first significant one, would not hold its alpha).
    if len(pairs) + len(notes) < claim.trials or len(pairs) < 2:
        return {**_not_run(claim, len(pairs), "paired trials"), "trial_ids": ids,
                "details": {"notes": notes}}
    a_vals = np.array([p[1] for p in pairs])
    b_vals = np.array([p[2] for p in pairs])
    d = b_vals - a_vals if claim.direction is Direction.lower else a_vals - b_vals
    boundary = -claim.margin if claim.margin is not None else claim.min_effect
    t = PairedTest(claim.test, d, claim.alpha, boundary, claim.sides)
    p = t.p_value()
    details = {
        "subject": subject.name, "baseline": baseline.name, "seeds": [p[0] for p in pairs],
        "subject_mean": float(a_vals.mean()), "baseline_mean": float(b_vals.mean()),
        "differences": [float(x) for x in d], "sd": t.sd, "boundary": boundary,
        "test": t.name(effect_unit(claim) or ""), "notes": notes,
    }
    out = {"effect": t.effect, "ci": t.ci(), "ci_level": t.ci_level, "p_value": p,
           "n": len(pairs), "trial_ids": ids, "details": details}
    return {**out, **_paired_word(claim, t, p, details)}


def _paired_word(claim: Claim, t: PairedTest, p: float, details: dict) -> dict[str, Any]:
    sub, base, b = details["subject"], details["baseline"], t.boundary
    what = (f"the non-inferiority margin {claim.margin:g}" if claim.margin is not None
            else f"the smallest effect that matters, {claim.min_effect:g}")
    if p < claim.alpha and t.effect > b:
        reason = (f"{sub} matches or beats {base}: difference {t.effect:.4g}, above -margin "
                  f"{b:g}" if claim.margin is not None else
                  f"{sub} better than {base} by {t.effect:.4g}, significantly more than {b:g}")
        return {"verdict": VerdictWord.VALIDATED, "reason": f"{reason} (p={p:.3g})"}
    if p < claim.alpha:
        return {"verdict": VerdictWord.DISPROVEN,
                "reason": f"{sub} vs {base}: difference {t.effect:.4g}, significantly below "
                          f"{what} (p={p:.3g})"}
    need = t.trials_needed()
    n = len(t.d)
    needed = None if not math.isfinite(need) else max(math.ceil(need), n + 1)
    more = (f"about {needed} paired trials would decide it" if needed
            else "no trial count decides it at the observed effect")
    return {"verdict": VerdictWord.INCONCLUSIVE, "trials_needed": needed,
            "reason": f"effect {t.effect:.4g} ± sd {t.sd:.3g} over {n} pairs, not "
                      f"distinguishable from {b:g} (p={p:.3g}): {more}"}


def _metric(row: dict, path: str) -> float:
    try:
        return paths.scalar(row, path)
    except paths.PathMissing:
        return math.nan


# ---------------------------------------------------------------------------------------------
# Correlation


def _correlation(claim: Claim, rows: list[dict]) -> dict[str, Any]:
    (arm,) = claim.arms
    trials = list(rows_by_arm(claim, _ran(rows))[arm.name].values())
    xs, ys, used = [], [], []
    for row in trials:
        try:
            x, y = paths.values(row, claim.x), paths.values(row, claim.y)
        except paths.PathMissing:
            continue
        if len(x) == len(y) and (not xs or len(x) == len(xs[0])):
            xs.append(x), ys.append(y), used.append(row["run_id"])
    if not xs:
        return {**_not_run(claim, 0), "reason": f"no trial carries {claim.x} and {claim.y}"}
    # Per-layer geometry is a property of the weights, not of the seed: average across trials
    # so repeated seeds do not pose as extra layers.
    x, y = np.mean(xs, axis=0), np.mean(ys, axis=0)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    ids = tuple(sorted(used))
    if len(x) < 4:
        return {**_not_run(claim, len(x), "layers"), "trial_ids": ids}
    sign = 1 if claim.direction is Direction.positive else -1
    boundary = sign * claim.min_effect
    c = correlation(x, y, claim.test, boundary, claim.alpha, claim.sides)
    details = {"pearson_r": c.pearson[0], "pearson_p": c.pearson[1],
               "spearman_r": c.spearman[0], "spearman_p": c.spearman[1],
               "claimed_sign": claim.direction.value, "test": claim.test.value,
               "boundary": boundary}
    out = {"effect": c.r, "ci": c.ci, "ci_level": c.ci_level, "p_value": c.p_value,
           "n": len(x), "trial_ids": ids, "details": details}
    interval = f"{c.ci_level:.0%} interval [{c.ci[0]:.3f}, {c.ci[1]:.3f}]"
    if c.p_value < claim.alpha and sign * (c.r - boundary) > 0:
        word, why = VerdictWord.VALIDATED, (
            f"r = {c.r:.3f}: the {interval} lies beyond r = {boundary:g} on the claimed side "
            f"(p={c.p_value:.3g})")
    elif c.p_value < claim.alpha:
        word, why = VerdictWord.DISPROVEN, (
            f"r = {c.r:.3f}: the {interval} excludes a {claim.direction.value} correlation "
            f"of {claim.min_effect:g} or more (p={c.p_value:.3g})")
    else:
        out["trials_needed"] = (max(math.ceil(c.trials_needed), len(x) + 1)
                                if math.isfinite(c.trials_needed) else None)
        more = (f"about {out['trials_needed']} would decide" if out["trials_needed"]
                else "no count decides at the observed r")
        word, why = VerdictWord.INCONCLUSIVE, (
            f"r = {c.r:.3f} over {len(x)} entries, not distinguishable from {boundary:g} "
            f"(p={c.p_value:.3g}); {more}")
    return {**out, "verdict": word, "reason": why}


# ---------------------------------------------------------------------------------------------
# Invariant and counterexample search


_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt,
        ">": operator.gt}


def invariant_violations(row: dict, text: str, tolerance: float) -> tuple[int, list[str]]:
    """(elements checked, violations) of 'lhs OP rhs' (or a conjunction 'A and B ...', every
    clause counted) in one row.

    The slack is relative: lhs <= rhs holds if lhs <= rhs + tolerance * max(1, |rhs|).
    """
    clauses = paths.invariant_clauses(text)
    if len(clauses) > 1:
        found = [invariant_violations(row, clause, tolerance) for clause in clauses]
        return sum(n for n, _ in found), [b for _, bad in found for b in bad]
    lhs_path, op, rhs = paths.parse_invariant(text)
    lhs = paths.resolve(row, lhs_path)
    rhs_vals = ([(None, rhs)] * len(lhs) if isinstance(rhs, float)
                else paths.resolve(row, rhs))
    if len(rhs_vals) != len(lhs):
        raise paths.PathMissing(f"{text}: {len(lhs)} left values but {len(rhs_vals)} right")
    bad = []
    for (loc, a), (_, b) in zip(lhs, rhs_vals, strict=True):
        a, b = paths._as_float(a), paths._as_float(b)
        slack = tolerance * max(1.0, abs(b)) if math.isfinite(b) else 0.0
        if op in ("<=", "<"):
            ok = _OPS[op](a, b + slack)
        elif op in (">=", ">"):
            ok = _OPS[op](a, b - slack)
        else:
            ok = abs(a - b) <= slack
        if not ok:  # NaN compares false: a non-finite value is a violation
            bad.append(f"{row['run_id']} {loc}: {a:.6g} {op} {b:.6g} fails")
    return len(lhs), bad


def _invariant(claim: Claim, rows: list[dict]) -> dict[str, Any]:
    ran = [r for arm_rows in rows_by_arm(claim, _ran(rows)).values() for r in arm_rows.values()]
    checked, violations, missing = 0, [], []
    for row in ran:
        try:
            n, bad = invariant_violations(row, claim.invariant, claim.tolerance)
        except paths.PathMissing as err:
            missing.append(f"{row['run_id']}: {err}")
            continue
        checked += n
        violations += bad
    ids = _ids(ran)
    details = {"violations": violations[:20], "violation_count": len(violations),
               "missing": missing}
    base = {"n": checked, "trial_ids": ids, "details": details}
    if violations:
        return {**base, "verdict": VerdictWord.DISPROVEN,
                "reason": f"{len(violations)} violation(s) of {claim.invariant}; first: "
                          f"{violations[0]}"}
    complete = len(ran) - len(missing)
    if complete < claim.trials * len(claim.arms):
        return {**base, **_not_run(claim, complete), "n": checked,
                "reason": f"{complete} of {claim.trials * len(claim.arms)} trials carry "
                          f"{claim.invariant.split()[0]}, no violation so far"}
    return {**base, "verdict": VerdictWord.VALIDATED,
            "reason": f"{claim.invariant} held at all {checked} checked points in "
                      f"{complete} trials"}


def _counterexample(claim: Claim, rows: list[dict]) -> dict[str, Any]:
    ran = [r for arm_rows in rows_by_arm(claim, _ran(rows)).values() for r in arm_rows.values()]
    found = [f"{r['run_id']}: {why}" for r in ran for why in _counterexample_reasons(claim, r)]
    base = {"n": len(ran), "trial_ids": _ids(ran), "details": {"counterexamples": found}}
    if found:
        return {**base, "verdict": VerdictWord.DISPROVEN,
                "reason": f"{len(found)} counterexample(s) in {len(ran)} trials; first: "
                          f"{found[0]}"}
    if len(ran) < claim.trials * len(claim.arms):
        return {**base, **_not_run(claim, len(ran))}
    return {**base, "verdict": VerdictWord.VALIDATED,
            "reason": f"no counterexample in {len(ran)} trials searched"}


def _counterexample_reasons(claim: Claim, row: dict) -> list[str]:
    reasons = []
    if row.get("status") == "diverged" or row.get("stop_reason") == "diverged":
        reasons.append("diverged")
    if claim.metric is not None:
        value, ref = _metric(row, claim.metric), _metric(row, claim.reference)
        gain = ref - value if claim.direction is Direction.lower else value - ref
        if not gain > claim.min_effect:  # NaN compares false: a missing value counts
            by = f" by more than {claim.min_effect:g}" if claim.min_effect else ""
            reasons.append(f"{claim.metric} {value:.6g} does not improve on "
                           f"{claim.reference} {ref:.6g}{by}")
    if claim.invariant is not None:
        try:
            _, bad = invariant_violations(row, claim.invariant, claim.tolerance)
        except paths.PathMissing as err:
            bad = [f"invariant not logged ({err})"]
        reasons += [f"invariant broke at {b.split(' ', 1)[1]}" if " " in b else b
                    for b in bad[:1]]
    return reasons


# ---------------------------------------------------------------------------------------------
# By construction


def _by_construction(claim: Claim, rows: list[dict]) -> dict[str, Any]:
    checks = sorted((r for r in _ran(rows) if r.get("seed") in claim.seeds),
                    key=lambda r: r["run_id"])
    by_seed: dict[int, dict] = {}
    for row in checks:
        by_seed.setdefault(row["seed"], row)
    if len(by_seed) < claim.trials:
        return _not_run(claim, len(by_seed), "checks")
    errors = [(_metric(r, "metrics.abs_error"), r) for r in by_seed.values()]
    worst, worst_row = max(errors, key=lambda e: -1.0 if not math.isfinite(e[0]) else e[0])
    base = {"n": len(by_seed), "trial_ids": _ids(by_seed.values()), "effect": worst,
            "details": {"check": claim.check, "tolerance": claim.tolerance,
                        "values": [_metric(r, "metrics.value") for r in by_seed.values()]}}
    bad = [r for e, r in errors if not (e <= claim.tolerance)]
    if bad:
        return {**base, "verdict": VerdictWord.DISPROVEN,
                "reason": f"{claim.check}: |value - expected| = {_metric(bad[0], 'metrics.abs_error'):.3g}"
                          f" > tolerance {claim.tolerance:g} ({bad[0]['run_id']})"}
    return {**base, "verdict": VerdictWord.PROVEN,
            "reason": f"{claim.check}: max |value - expected| = {worst:.3g} <= "
                      f"{claim.tolerance:g} over {len(by_seed)} seeds"}
