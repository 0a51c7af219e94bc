"""`make results` (runner.report): byte-stable output, one clear line for a corrupt ledger file,
one colour per arm, and checks and smoke runs kept out of the headline Totals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.claims.schema import CLAIM_DIR, load_claim
from runner.claims.verdicts import Verdict, VerdictWord
from runner.report import build_all, figures
from runner.report.claims_pages import Entry, claims_json, claims_page, readme_block
from runner.report.format import round_floats, round_sig
from runner.report.ledger import LedgerError, read_trials

ROOT = Path(__file__).resolve().parent.parent
# One value as two machines computed it (a sum in another order): equal to 15 digits only.
NOISY = (0.061583160105640015, 0.06158316010564003)


def _verdict(claim, word=VerdictWord.VALIDATED, **kw) -> Verdict:
    return Verdict(claim.id, claim.rule_hash, claim.kind.value, word, "a reason",
                   experiment=kw.pop("experiment", "unit"), **kw)


# ---------------------------------------------------------------------------------------------
# Byte-stable output


def test_round_sig_keeps_six_significant_digits() -> None:
    assert round_sig(NOISY[0]) == round_sig(NOISY[1]) == 0.0615832
    assert round_sig(-1234567.0) == -1234570.0 and round_sig(0.0) == 0.0
    assert round_floats({"a": [1.0000004, True, 3, None, (2.5e-17,)]}) == \
        {"a": [1.0, True, 3, None, [2.5e-17]]}


def test_claims_json_is_byte_stable_for_floats_that_differ_in_the_last_bits() -> None:
    claim = load_claim("derived_beats_sgd")
    texts = []
    for value in NOISY:
        v = _verdict(claim, effect=value, ci=(value - 0.1, value + 0.1), p_value=value,
                     details={"differences": [value, -value], "sd": value})
        texts.append(claims_json([Entry(claim, v, False)]))
    assert NOISY[0] != NOISY[1] and texts[0] == texts[1]
    assert json.loads(texts[0])[0]["verdict"]["effect"] == 0.0615832


def test_figures_are_byte_stable_and_carry_no_software_tag() -> None:
    pngs = [figures.loss_curves({"derived": [figures.Curve([0, 100], [3.0, 3.0 - v])]}, "t")
            for v in NOISY]
    assert pngs[0] == pngs[1]
    assert b"Software" not in pngs[0] and b"matplotlib" not in pngs[0].lower()


# ---------------------------------------------------------------------------------------------
# A corrupt ledger file


def test_a_corrupt_trial_file_gives_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    trials = tmp_path / "results" / "trials"
    trials.mkdir(parents=True)
    (trials / "a.json").write_text('{"run_id": "a", "metrics": {')  # cut off mid-write
    with pytest.raises(LedgerError, match=r"a\.json: corrupt trial file"):
        read_trials(tmp_path / "results")
    proc = subprocess.run(
        [sys.executable, "-m", "runner.report", "--results-dir", str(tmp_path / "results"),
         "--docs-dir", str(tmp_path / "docs"), "--readme", str(tmp_path / "README.md")],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and str(trials / "a.json") in lines[0]


def test_a_row_without_run_id_is_named(tmp_path: Path) -> None:
    trials = tmp_path / "trials"
    trials.mkdir()
    (trials / "b.json").write_text("[1, 2]")
    with pytest.raises(LedgerError, match=r"b\.json: corrupt trial file \(a JSON list"):
        read_trials(tmp_path)


# ---------------------------------------------------------------------------------------------
# One colour per arm


def test_every_arm_gets_its_own_colour() -> None:
    arms = ["derived", "schedulefree", "sgd", "adamw_grid", "prodigy", "derived @ cpu",
            "derived @ mlx", "sgd @ mlx", *(f"derived_reading_{i}" for i in range(30))]
    colours = figures.arm_colours(arms)
    assert set(colours) == set(arms) and len(set(colours.values())) == len(arms)
    assert colours["derived"] == figures.KNOWN_ARMS["derived"]
    assert colours["schedulefree"] != colours["derived"]
    # stable: the same arms give the same map whatever their order
    assert figures.arm_colours(reversed(arms)) == colours


def test_each_arm_in_a_figure_has_a_distinct_colour(monkeypatch) -> None:
    drawn = []
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or b"")
    arms = ["adamw_grid", "derived", "prodigy", "schedulefree", "sgd", "derived_signfree"]
    curve = figures.Curve([0, 10, 20], [3.0, 2.9, 2.8], [0.0, 1.0, 2.0])
    figures.loss_curves({a: [curve, curve] for a in arms}, "t")
    figures.learning_curves({a: [curve] for a in arms}, "t")
    for fig in drawn:
        for ax in fig.axes:
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            assert len(lines) == len(arms)
            assert len({ln.get_color() for ln in lines}) == len(arms)
    assert len(drawn[1].axes) == 2  # the trials recorded seconds: a panel against seconds


# ---------------------------------------------------------------------------------------------
# Checks and smoke runs apart from the claims


def _mixed_entries() -> list[Entry]:
    sgd, weyl = load_claim("derived_beats_sgd"), load_claim("mass_within_weyl_bound")
    corr = load_claim("stable_rank_predicts_adapter_rank")
    return [
        Entry(sgd, _verdict(sgd, VerdictWord.DISPROVEN, effect=-0.5, n=3,
                            deciding_test="paired t, two-sided"), False),
        Entry(corr, _verdict(corr, VerdictWord.VALIDATED, effect=0.4, n=30), False),
        Entry(weyl, _verdict(weyl, VerdictWord.VALIDATED, n=25, is_check=True), False),
        Entry(sgd, _verdict(sgd, VerdictWord.VALIDATED, experiment="quickstart", effect=0.1,
                            n=3, smoke=True), False),
    ]


def test_checks_and_smoke_runs_have_their_own_tables_outside_the_totals() -> None:
    page = claims_page(_mixed_entries(), [])
    head, rest = page.split("## Implementation checks", 1)
    checks, smoke = rest.split("## Smoke runs (random-init models)", 1)
    assert "Totals (claims on real models): 1 VALIDATED, 1 DISPROVEN." in head
    assert "mass_within_weyl_bound" not in head
    assert "| [mass_within_weyl_bound](#mass_within_weyl_bound) | unit | Derived training keeps " \
        "every adapter inside its Weyl bound (`curves.steps[*].adapter_norm_ratio <= 1`" in checks
    smoke_table = smoke.split("## How verdicts are decided")[0]
    assert "| [derived_beats_sgd](#derived_beats_sgd) | quickstart | **VALIDATED** |" in smoke_table
    assert "Smoke totals: 1 VALIDATED." in smoke_table
    readme = readme_block(_mixed_entries(), [])
    assert "Totals (claims on real models): 1 VALIDATED, 1 DISPROVEN." in readme
    assert "### Implementation checks" in readme and "### Smoke runs" in readme
    tables = [e["table"] for e in json.loads(claims_json(_mixed_entries()))]
    assert tables == ["claims", "claims", "checks", "smoke"]


def test_each_verdict_names_its_deciding_test_and_effect_unit() -> None:
    page = claims_page(_mixed_entries(), [])
    assert "| **DISPROVEN** | paired t, two-sided | -0.5000 | nats |" in page
    assert "| **VALIDATED** | Pearson | 0.4000 | r |" in page  # fall-backs from the rule
    assert "effect -0.5000 nats" in page and "decided by paired t, two-sided" in page


def test_a_by_construction_rule_is_a_check_even_before_the_verdict_says_so() -> None:
    cka = load_claim("procrustes_cka_in_sample", CLAIM_DIR)
    entry = Entry(cka, _verdict(cka, VerdictWord.PROVEN, effect=0.0, n=3), False)
    assert entry.is_check
    page = claims_page([entry], [])
    assert "Totals (claims on real models): none." in page and "## Implementation checks" in page


def test_build_all_twice_changes_nothing(tmp_path: Path) -> None:
    """The committed ledger rebuilt twice into a fresh tree: the second run writes nothing."""
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    readme.write_text("# X\n")
    assert build_all(ROOT / "results", docs, readme, tmp_path / "claims.json")
    assert build_all(ROOT / "results", docs, readme, tmp_path / "claims.json") == []


def test_token_axes_and_legend_counts_read_plainly() -> None:
    from runner.report.figures import TOKENS, _count

    assert [TOKENS(x, None) for x in (0, 500, 20000, 140000, 2500)] == [
        "0", "500", "20k", "140k", "2.5k"]
    assert (_count(1, "run"), _count(3, "seed")) == ("1 run", "3 seeds")
