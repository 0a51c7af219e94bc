"""The seed's measured rows as claims: measured arms planned by task=claims (semantic highway,
family geometry), generation accuracy and degenerate outputs, retention replay, and the
pullback metric logged by derived_seed_code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import compose_config

from runner.app import run_job
from runner.claims import VerdictWord, decide, load_claim
from runner.claims.measurements import MEASUREMENTS
from runner.config.load import to_run_config
from runner.data import DataError, load_splits, replay_count
from runner.generation import (
    degenerate_reason,
    greedy_generate,
    held_out_pairs,
    is_match,
    normalise_answer,
)
from runner.ledger import read_trials
from runner.models.loading import load_model
from runner.tasks.claims import plan_trials, run_claims
from runner.tasks.family_geometry import curvature_excess, geodesic_excess
from runner.tasks.measured import MEASURED

TINY = ["model=tiny_llama", "hardware.threads=1", "allow_dirty=true", "verify_adapter=false"]


def tiny_cfg(tmp_path: Path, *extra: str):
    return to_run_config(compose_config([*TINY, f"results_dir={tmp_path}/results",
                                         f"runs_dir={tmp_path}/runs", *extra]))


# ---------------------------------------------------------------------------------------------
# Definitions: normalised match and degenerate outputs


@pytest.mark.parametrize(("generated", "answer", "match"), [
    ("os.path", "os.path", True),
    ("  OS.Path.\n", "os.path", True),  # case, punctuation and whitespace do not count
    ("os_path", "os.path", True),  # underscores are punctuation
    ("os", "os.path", False),
    ("the module os.path", "os.path", False),  # exact after normalising, not containment
    ("", "", False),  # an answer that normalises to nothing never matches
    ("...", "!!", False),
])
def test_normalised_match(generated: str, answer: str, match: bool) -> None:
    assert is_match(generated, answer) is match


def test_normalise_answer_keeps_letters_and_digits_only() -> None:
    assert normalise_answer(" Base64, Ünïcode_X!\t") == "base64ünïcodex"


@pytest.mark.parametrize(("text", "ids", "eos", "reason"), [
    ("json", [10, 11], True, None),
    ("   \n", [5, 5], True, "empty"),  # empty after strip
    ("", [], True, "empty"),
    ("a b c d e f g h", list(range(16)), False, "runaway"),  # 16 tokens, limit 16, no EOS
    ("a b c", list(range(15)), False, None),  # under the limit without EOS: not runaway
    ("x", [1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 4], True, "repetition"),  # a 4-gram x3
    ("x", [1, 2, 3, 4, 9, 1, 2, 3, 4], True, None),  # the same 4-gram twice only
    ("x", [1, 2, 1, 2, 3, 3, 1, 2], True, "repetition"),  # 3 distinct of 8 < 0.5
    ("x", [1, 2, 3, 4, 1, 2, 5, 6], True, None),  # 6 distinct of 8: fine
])
def test_degenerate_reasons(text: str, ids: list[int], eos: bool, reason: str | None) -> None:
    assert degenerate_reason(text, ids, eos, max_new_tokens=16) == reason


def test_batched_greedy_generation_matches_one_prompt_at_a_time() -> None:
    """Left padding with position ids: a prompt's continuation does not depend on its batch."""
    cfg = tiny_cfg(Path("/tmp"))
    loaded = load_model(cfg.model)
    prompts = ["Which module defines `x`?\n", "Hi\n", "A somewhat longer prompt here.\n"]
    batched = greedy_generate(loaded.model, loaded.tokenizer, prompts, 6)
    alone = [greedy_generate(loaded.model, loaded.tokenizer, [p], 6)[0] for p in prompts]
    assert batched == alone
    # and the first token is the argmax of the model's own next-token logits
    ids = torch.tensor([loaded.tokenizer.encode(prompts[0], add_special_tokens=True)])
    with torch.no_grad():
        first = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
    assert (batched[0][0][:1] or [loaded.tokenizer.eos_token_id]) == [first]


def test_held_out_pairs_are_the_validation_split() -> None:
    pairs = held_out_pairs("data/stdlib_modules/train.jsonl", 0.15, 40)
    assert len(pairs) == 40 and all(p.prompt.endswith("\n") and p.answer for p in pairs)
    with pytest.raises(DataError, match="generation_examples=10000"):
        held_out_pairs("data/stdlib_modules/train.jsonl", 0.15, 10_000)


# ---------------------------------------------------------------------------------------------
# Retention replay


def test_replay_mixes_the_declared_fraction_from_the_unevaluated_half() -> None:
    loaded = load_model(tiny_cfg(Path("/tmp")).model)
    kw = dict(max_seq_len=256, val_fraction=0.15, max_examples=200,
              retention_path="data/pydoc_topics/retention.jsonl")
    plain = load_splits("data/stdlib_modules/train.jsonl", loaded.tokenizer, **kw)
    mixed = load_splits("data/stdlib_modules/train.jsonl", loaded.tokenizer, **kw,
                        replay_fraction=0.2)
    n_own = len(plain.train)
    assert mixed.replayed == replay_count(0.2, n_own) and mixed.own_train == plain.train
    assert abs(mixed.replayed / len(mixed.train) - 0.2) < 1 / len(mixed.train)
    replayed = set(mixed.train[n_own:])
    # the replayed records come from the retention file, never from its evaluated half (two
    # records cut to the same opening tokens can coincide: only whole records are compared)
    assert replayed <= set(plain.retention)
    assert not {e for e in replayed if not e.truncated} & set(mixed.retention)
    assert 0 < len(mixed.retention) < len(plain.retention)
    with pytest.raises(DataError, match="replay_fraction must be in"):
        load_splits("data/stdlib_modules/train.jsonl", loaded.tokenizer, **kw,
                    replay_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Measured arms in task=claims


def test_every_measurement_has_a_runner() -> None:
    assert set(MEASUREMENTS) == set(MEASURED)


def test_measured_arm_is_planned_one_trial_per_seed(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "task=claims", "claims=[semantic_highway]")
    plans = plan_trials(cfg, load_claim("semantic_highway"))
    assert [(p.arm, p.seed, p.measured) for p in plans] == [
        ("profile", s, "dimension_profile") for s in range(3)]
    assert len({p.config_hash for p in plans}) == 3


def test_semantic_highway_is_decided_by_task_claims(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "task=claims", "+experiment=quickstart", "task.points=120",
                   "task.resamples=200", "data.max_examples=400", "model.tiny.num_hidden_layers=3",
                   "claims=[semantic_highway]")
    (verdict,) = run_claims(cfg, ["semantic_highway"])
    rows = [r for r in read_trials(cfg.results_dir) if r["claim_id"] == "semantic_highway"]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    assert {r["arm"] for r in rows} == {"dimension_profile"} and all(r["data_sha256"]
                                                                    for r in rows)
    assert verdict.verdict in (VerdictWord.VALIDATED, VerdictWord.DISPROVEN)
    assert verdict.n == 3 and verdict.rule_hash != load_claim("semantic_highway").rule_hash
    ratios = [r["metrics"]["semantic_highway"]["compression_ratio"] for r in rows]
    assert (verdict.verdict is VerdictWord.VALIDATED) == all(x <= 0.8 for x in ratios)
    # a second job reuses every trial
    before = len(list((Path(cfg.results_dir) / "trials").glob("*.json")))
    run_claims(cfg, ["semantic_highway"])
    assert len(list((Path(cfg.results_dir) / "trials").glob("*.json"))) == before


def test_family_geometry_is_skipped_without_a_second_family(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "task=claims", "+experiment=quickstart", "task.points=60")
    (verdict,) = run_claims(cfg, ["weight_euclidean_activation_curved"])
    assert verdict.verdict is VerdictWord.SKIPPED
    assert "no second model family" in verdict.reason and "task.other_model" in verdict.reason


def test_family_geometry_measures_two_families(tmp_path: Path) -> None:
    from test_models_hf import save_tiny

    other = save_tiny(tmp_path / "tiny-qwen2", "qwen2")
    cfg = tiny_cfg(tmp_path, "task=claims", "+experiment=quickstart", "task.points=60",
                   "data.max_examples=300", f"task.other_model={other}")
    (verdict,) = run_claims(cfg, ["weight_euclidean_activation_curved"])
    rows = read_trials(cfg.results_dir)
    assert len(rows) == 3 and verdict.verdict in (VerdictWord.VALIDATED, VerdictWord.DISPROVEN)
    models = rows[0]["metrics"]["family_geometry"]["models"]
    assert [m["model_type"] for m in models] == ["llama", "qwen2"]
    assert all(math.isfinite(m["weight_excess"]) and math.isfinite(m["activation_excess"])
               for m in models)
    gaps = [r["metrics"]["family_geometry"]["min_gap"] for r in rows]
    assert (verdict.verdict is VerdictWord.VALIDATED) == all(g >= 0.1 for g in gaps)


def test_curvature_excess_is_zero_for_flat_high_dimensional_clouds_only() -> None:
    """The raw excess grows with dimension on flat data; measured against its flat null the
    excess of a flat 20-dimensional cloud is about 0 and a curved one (a Swiss roll) stays
    clearly above it."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((64, 20)))
    flat = rng.standard_normal((400, 20)) @ basis.T  # flat, 20 dimensions, in R^64
    assert geodesic_excess(flat, 10, np.random.default_rng(1)) > 0.3  # the raw bias
    assert abs(curvature_excess(flat, 10, np.random.default_rng(1))) < 0.1
    t = 1.5 * np.pi * (1 + 2 * rng.random(400))
    roll = np.stack([t * np.cos(t), 20 * rng.random(400), t * np.sin(t)], axis=1)
    assert curvature_excess(roll, 10, np.random.default_rng(1)) > 0.15


def test_geodesic_excess_flat_line_and_curved_arc() -> None:
    rng = np.random.default_rng(0)
    t = np.sort(rng.random(200))
    line = np.stack([t, 2 * t, -t], axis=1)  # a straight segment: paths are chords
    assert geodesic_excess(line, 5, rng) == pytest.approx(0.0, abs=1e-9)
    angle = 1.5 * np.pi * t  # an open arc: arc / chord - 1 = (theta/2)/sin(theta/2) - 1 > 0
    arc = np.stack([np.cos(angle), np.sin(angle), 0 * t], axis=1)
    excess = geodesic_excess(arc, 5, rng)
    assert 0.02 < excess < 3 * math.pi / 4 / math.sin(3 * math.pi / 4) - 1
    # invariant to rotation, translation and scale
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    assert geodesic_excess(3 * arc @ q + 1, 5, np.random.default_rng(0)) == pytest.approx(
        geodesic_excess(arc, 5, np.random.default_rng(0)), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Answer-mask + replay: a trained trial records its generations; the claim reads them


def test_train_records_generations_replay_and_retention_change(tmp_path: Path) -> None:
    row = run_job(compose_config([
        *TINY, "task=train", "data=stdlib_modules", "data.generation_examples=6",
        "data.max_new_tokens=4", "data.max_seq_len=256", "budget.max_tokens=600",
        "budget.eval_every=4", "budget.eval_examples=4",
        f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]))
    gen = row["metrics"]["generation"]
    assert gen["examples"] == 6 and gen["max_new_tokens"] == 4
    assert 0 <= gen["degenerate_final"] <= 6 and len(gen["samples"]) == 6
    assert row["data_sizes"]["replayed"] == replay_count(0.2, row["data_sizes"]["train"] -
                                                         row["data_sizes"]["replayed"])
    m = row["metrics"]
    assert m["retention_loss_increase"] == pytest.approx(
        m["retention_loss_final"] - m["retention_loss_initial"])
    claim = load_claim("answer_mask_retention_replay")
    rows = [{**row, "claim_id": claim.id, "rule_hash": claim.rule_hash, "claim_arm": "adamw",
             "run_id": f"r{s}", "seed": s} for s in range(3)]
    verdict = decide(claim, rows)
    bad = gen["degenerate_final"] > 0 or m["retention_loss_increase"] > 0.1 or \
        not gen["accuracy_final"] > gen["accuracy_initial"]
    assert verdict.verdict is (VerdictWord.DISPROVEN if bad else VerdictWord.VALIDATED)


def test_conjunction_invariant_fails_on_either_clause(tmp_path: Path) -> None:
    claim = load_claim("answer_mask_retention_replay")

    def trial(seed: int, degenerate: int, increase: float) -> dict:
        return {"run_id": f"r{seed}", "claim_id": claim.id, "rule_hash": claim.rule_hash,
                "claim_arm": "adamw", "seed": seed, "status": "ok", "config": {},
                "metrics": {"generation": {"accuracy_initial": 0.1, "accuracy_final": 0.5,
                                           "degenerate_final": degenerate},
                            "retention_loss_increase": increase}}

    ok = [trial(s, 0, 0.05) for s in range(3)]
    assert decide(claim, ok).verdict is VerdictWord.VALIDATED
    assert decide(claim, [*ok[:2], trial(2, 1, 0.0)]).verdict is VerdictWord.DISPROVEN
    assert decide(claim, [*ok[:2], trial(2, 0, 0.2)]).verdict is VerdictWord.DISPROVEN


# ---------------------------------------------------------------------------------------------
# Pullback metric through derived_seed_code training


def test_seed_code_run_logs_the_pullback_metric_at_every_evaluation(tmp_path: Path) -> None:
    from geometry.pullback import pullback_metric_deviation

    row = run_job(compose_config([
        *TINY, "task=train", "trainer=derived_seed_code", "data.max_examples=80", "data.max_seq_len=96",
        "budget.max_tokens=700", "budget.eval_every=3",
        "budget.eval_examples=4", "trainer.noise_examples=8",
        f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]))
    points = row["metrics"]["pullback"]
    steps = row["metrics"]["steps"]
    assert [p["step"] for p in points] == sorted({0, *range(3, steps + 1, 3), steps})
    assert all(0 < p["median_deviation"] <= p["max_deviation"] for p in points)
    # at step 0: the seed code's start, A~, B~ ~ N(0, 0.01^2) (geometry.pullback's estimate)
    gen = torch.Generator().manual_seed(0)
    a, b = (0.01 * torch.randn(4, n, generator=gen, dtype=torch.float64) for n in (64, 128))
    expected = pullback_metric_deviation(a, b)
    assert points[0]["median_deviation"] == pytest.approx(expected, rel=0.5)
    claim = load_claim("pullback_metric_stays_identity")
    rows = [{**row, "claim_id": claim.id, "rule_hash": claim.rule_hash,
             "claim_arm": "derived_seed_code", "run_id": f"r{s}", "seed": s} for s in range(3)]
    verdict = decide(claim, rows)
    held = all(p["median_deviation"] <= 0.01 for p in points)
    assert verdict.verdict is (VerdictWord.VALIDATED if held else VerdictWord.DISPROVEN)
    assert json.dumps(points)  # plain JSON in the ledger
