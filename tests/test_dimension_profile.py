"""task=dimension_profile on tiny random models; the claim semantic_highway decided from its rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import compose_config

from runner.app import run_job
from runner.claims import VerdictWord, decide, load_claim
from runner.config.load import to_run_config
from runner.config.schema import Pooling
from runner.data import Example
from runner.errors import UserError
from runner.ledger import read_trials
from runner.models.loading import load_model
from runner.tasks.dimension_profile import (
    LayerDimension,
    highway_summary,
    plot_profile,
    residual_states,
    sample_positions,
)

SMALL = ["task=dimension_profile", "task.points=120", "task.resamples=200", "data.max_examples=400"]


def run_profile(tmp_path: Path, *extra: str) -> dict:
    return run_job(compose_config([*SMALL, "allow_dirty=true", f"results_dir={tmp_path}/results",
                                   f"runs_dir={tmp_path}/runs", *extra]))


def test_profile_writes_report_figure_and_claim_row(tmp_path: Path, capsys) -> None:
    report = run_profile(tmp_path, "model=tiny_llama")
    out = capsys.readouterr().out
    stem = f"tiny_llama-{report['model_sha256'][:12]}-all_tokens-s0"
    stored = json.loads((tmp_path / "runs" / "dimension_profile" / f"{stem}.json").read_text())
    png = (tmp_path / "runs" / "dimension_profile" / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in png
    # 2 blocks: the embeddings and both block outputs, every estimate finite and positive
    assert [p["layer"] for p in stored["profile"]] == [0, 1, 2]
    for p in stored["profile"]:
        assert 0 < p["ci_low"] <= p["twonn"] <= p["ci_high"] and p["mle"] > 0
        assert p["n_points"] + p["n_duplicates"] == 120
    (row,) = read_trials(tmp_path / "results")
    assert (row["claim_id"], row["claim_arm"]) == ("semantic_highway", "profile")
    assert row["rule_hash"] == load_claim("semantic_highway").rule_hash
    assert row["metrics"]["id_profile"] == stored["profile"]
    assert row["metrics"]["semantic_highway"]["compression_ratio"] is None  # no middle third
    assert list((tmp_path / "results" / "rules").glob("semantic_highway-*.json"))
    assert "TwoNN d" in out and "claim semantic_highway" in out and "INCONCLUSIVE" in out


def test_profile_runs_on_lfm2(tmp_path: Path) -> None:
    """The decoder blocks are found from the model, not from Llama names."""
    report = run_profile(tmp_path, "model=tiny_lfm2", "task.pooling=last_token")
    model_cfg = to_run_config(compose_config(["model=tiny_lfm2"])).model
    n_blocks = load_model(model_cfg).model.config.num_hidden_layers
    assert len(report["profile"]) == n_blocks + 1 and report["pooling"] == "last_token"


def test_residual_states_are_block_outputs() -> None:
    """Layer i is block i's output: equal to HF's hidden_states[i] for every block but the last
    (HF applies the final norm there, the profile does not)."""
    loaded = load_model(to_run_config(compose_config(["model=tiny_llama"])).model)
    examples = [Example(tuple(range(5, 17)), (0,) * 12), Example(tuple(range(30, 39)), (0,) * 9)]
    positions = [(0, 3), (0, 11), (1, 1), (1, 8)]
    states = residual_states(loaded.model, examples, positions, 0, "cpu", _quiet())
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([examples[0].input_ids]),
                           output_hidden_states=True).hidden_states
    n = loaded.model.config.num_hidden_layers
    assert len(states) == n + 1
    for layer in range(n):  # tolerance: the padded batch of two vs a batch of one (float32)
        np.testing.assert_allclose(states[layer][:2], ref[layer][0, [3, 11]].numpy(), atol=1e-5)


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def test_sample_positions_seeded_and_skip_position_zero() -> None:
    examples = [Example(tuple(range(n)), (0,) * n) for n in (5, 9, 30)]
    a = sample_positions(examples, 25, Pooling.all_tokens, np.random.default_rng(0))
    assert a == sample_positions(examples, 25, Pooling.all_tokens, np.random.default_rng(0))
    assert len(set(a)) == 25 and all(t >= 1 for _, t in a)
    assert sample_positions(examples * 7, 5, Pooling.last_token, np.random.default_rng(1)) == \
        sorted(sample_positions(examples * 7, 5, Pooling.last_token, np.random.default_rng(1)))
    assert all(t == len(examples[e % 3].input_ids) - 1 for e, t in
               sample_positions(examples * 7, 21, Pooling.last_token, np.random.default_rng(1)))
    with pytest.raises(UserError, match="token states"):
        sample_positions(examples[:1], 10, Pooling.last_token, np.random.default_rng(0))


def layer(i: int, d: float, half: float = 1.0) -> LayerDimension:
    return LayerDimension(i, d, d - half, d + half, d, 100, 0)


def test_highway_summary_hand_computed() -> None:
    # 6 blocks: middle third = blocks 3 and 4; first = 1, last = 6
    profile = [layer(0, 30), layer(1, 16), layer(2, 9), layer(3, 3), layer(4, 2), layer(5, 7),
               layer(6, 10)]
    s = highway_summary(profile)
    assert s["middle_layers"] == [3, 4] and s["middle_min_layer"] == 4
    assert s["compression_ratio"] == pytest.approx(3 / 9)  # (2 + 1) / min(15, 9)
    assert s["point_ratio"] == pytest.approx(2 / 10)


def profile_rows(claim, ratios: list[float]) -> list[dict]:
    return [{"run_id": f"r{seed}", "experiment": "x", "claim_id": claim.id,
             "rule_hash": claim.rule_hash, "claim_arm": "profile", "arm": "dimension_profile",
             "seed": seed, "status": "ok", "hardware": "cpu",
             "metrics": {"semantic_highway": {"compression_ratio": r}}}
            for seed, r in enumerate(ratios)]


def test_claim_decided_by_the_existing_engine() -> None:
    claim = load_claim("semantic_highway")
    assert decide(claim, profile_rows(claim, [0.3, 0.5, 0.79])).verdict is VerdictWord.VALIDATED
    assert decide(claim, profile_rows(claim, [0.3, 0.95, 0.5])).verdict is VerdictWord.DISPROVEN
    assert decide(claim, profile_rows(claim, [0.3])).verdict is VerdictWord.INCONCLUSIVE


def test_figure_byte_stable(tmp_path: Path) -> None:
    profile = [layer(i, 10 - i) for i in range(6)]
    a = plot_profile(profile, tmp_path / "a.png", "t").read_bytes()
    assert a == plot_profile(profile, tmp_path / "b.png", "t").read_bytes()
