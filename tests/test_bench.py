"""task=bench end to end on the tiny Llama (small settings, one thread), and docs/performance.md."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
from support import compose_config

from runner.app import run_job
from runner.config.load import to_run_config
from runner.report import build_all
from runner.report.performance_page import build_performance
from runner.tasks.bench import ARMS, QUICK, bench_settings, fixed_batches
from runner.tasks.bench_summary import summary_line
from runner.tasks.train import config_hash

LAST_LINE = re.compile(r"bench: tok_s_ratio=(\S+) mem_ratio=(\S+) derive_steps=(\S+) "
                       r"derive_steps_first=(\S+) mfu=(\S+) "
                       r"reading=derived_matched_mass reference=(adamw|peft_stock) "
                       r"recompute: tok_s_ratio=(\S+) mem_ratio=(\S+)")
THROUGHPUT_ARMS = {"adamw", "peft_stock", "adamw_all_linear", "prodigy", "schedulefree",
                   "derived", "derived_matched_mass", "derived_matched_mass_recompute",
                   "adamw_derived_shape"}
QUALITY_ARMS = {"adamw", "adamw_all_linear", "prodigy", "schedulefree", "derived",
                "derived_matched_mass", "derived_tail_start", "derived_uniform",
                "derived_seed_code", "adamw_grid"}
SMALL_TINY = ["task=bench", "model=tiny_llama", "hardware.threads=1", "task.repeats=2",
              "task.steps=2", "task.quality_tokens=800", "data.max_examples=120"]


def _run_bench(root: Path, overrides: list[str]) -> tuple[Path, str, dict]:
    """(results dir, stdout, the row) of one bench run."""
    cfg = compose_config([*overrides, f"results_dir={root / 'results'}",
                          f"runs_dir={root / 'runs'}"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        row = run_job(cfg)
    return root / "results", out.getvalue(), row


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, str, dict]:
    """One bench run with every arm, at small settings."""
    return _run_bench(tmp_path_factory.mktemp("bench"), SMALL_TINY)


def test_last_line_is_the_summary(bench) -> None:
    _, stdout, row = bench
    last = stdout.rstrip("\n").splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    values = [float(v) for v in (*match.groups()[:5], *match.groups()[6:])]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert last == summary_line(row["summary"])
    assert "fixed batches of 4 x 128 tokens" in stdout  # batch x data.max_seq_len, stated


def test_one_row_under_bench_and_none_in_trials(bench) -> None:
    results, _, row = bench
    files = list((results / "bench").glob("*.json"))
    assert len(files) == 1 and not (results / "trials").exists()
    stored = json.loads(files[0].read_text())
    assert stored["run_id"] == row["run_id"]
    s = stored["settings"]
    assert (s["repeats"], s["steps"], s["quick"]) == (2, 2, False)
    assert stored["tokens_per_step"] == s["batch_size"] * s["seq_len"]
    assert {t["arm"] for t in stored["throughput"]} == THROUGHPUT_ARMS
    for t in stored["throughput"]:
        assert len(t["tok_s"]) == s["repeats"] and t["tok_s_min"] <= t["tok_s_median"]
        assert t["peak_mb"] > 0 and 0 < t["mfu"] < 1 and t["all_finite"]
    derived = next(t for t in stored["throughput"] if t["arm"] == "derived")
    assert derived["adapters"].startswith("derived:")  # its rank and targets are its own
    assert 0 < derived["derive_seconds"] <= derived["setup_seconds"]
    # set up as the first seed (an empty cache: everything computed), then as every later seed
    # (the seed-independent steps, the noise probe included, read back)
    for t in stored["throughput"]:
        if t["arm"].startswith("derived"):
            assert (t["setup_cache_first"], t["setup_cache"]) == ("miss", "hit"), t["arm"]
    # the same-shape peer trains exactly the derived trainer's adapter parameters
    same = next(t for t in stored["throughput"] if t["arm"] == "adamw_derived_shape")
    assert same["adapters"].startswith("derived shape:")
    # (U: out x r, V: in x r, S: r) against PEFT's (B: out x r, A: r x in)
    assert same["trainable_params"] == derived["trainable_params"] - derived["rank_total"] > 0
    reading = next(t for t in stored["throughput"] if t["arm"] == "derived_matched_mass")
    assert stored["summary"]["same_shape_tok_s_ratio"] == pytest.approx(
        reading["tok_s_median"] / same["tok_s_median"])
    # recomputing the blocks in the backward: the same losses, step by step
    recompute = next(t for t in stored["throughput"]
                     if t["arm"] == "derived_matched_mass_recompute")
    assert recompute["losses"] == reading["losses"] and len(reading["losses"]) == 1 + 2 * 2
    assert {q["arm"] for q in stored["quality"]} == QUALITY_ARMS
    for t in stored["throughput"]:  # the whole process's peak spans every phase
        assert t["peak_mb"] == t["process_peak_mb"] >= max(t["load_peak_mb"], t["train_peak_mb"])
    grid = next(q for q in stored["quality"] if q["arm"] == "adamw_grid")
    assert grid["tuning_tokens"] == grid["grid_points"] * grid["tokens"]  # same budget per point
    # the target is the grid's final validation loss, which the grid reaches at its last point
    assert stored["quality_target"] == {"val_loss": grid["val_loss_final"], "source": "adamw_grid"}
    assert grid["to_target"]["tokens"] <= grid["tokens"]
    for q in stored["quality"]:
        assert q["tokens"] >= s["quality_tokens"] or q["stop_reason"] != "budget"
        assert q["curve"][0]["tokens"] == 0 and len(q["curve"]) >= 2


def test_performance_page_is_rendered_and_idempotent(bench, tmp_path: Path) -> None:
    results, _, row = bench
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    changed = build_all(results, docs, readme)
    page = docs / "performance.md"
    assert page in changed
    text = page.read_text()
    assert row["run_id"] in text and "6·N·T" in text and "Quality per compute" in text
    derived = next(t for t in row["throughput"] if t.get("setup_peak_mb") is not None)
    phases = " / ".join(f"{derived[k]:,.0f}" for k in ("load_peak_mb", "setup_peak_mb",
                                                       "steps_peak_mb"))
    assert "load / set-up / steps MB" in text and f"| {phases} |" in text
    assert "Under `hardware.recompute=true` (`derived_matched_mass_recompute`" in text
    pngs = sorted((docs / "performance").glob("*.png"))
    assert len(pngs) == 2
    before = {p: p.read_bytes() for p in [page, *pngs]}
    assert build_all(results, docs, readme) == []  # a second build changes nothing
    assert {p: p.read_bytes() for p in before} == before


def test_no_bench_rows_gives_a_page_that_says_so(tmp_path: Path) -> None:
    changed = build_performance(tmp_path / "results", tmp_path / "docs")
    assert changed == [tmp_path / "docs" / "performance.md"]
    assert "No bench runs yet" in changed[0].read_text()
    assert build_performance(tmp_path / "results", tmp_path / "docs") == []


def test_quick_caps_and_bench_options_leave_trial_hashes_alone() -> None:
    cfg = to_run_config(compose_config(["task=bench", "task.quick=true", "task.repeats=9"]))
    s = bench_settings(cfg)
    assert (s.repeats, s.steps, s.quality_tokens) == (QUICK["repeats"], QUICK["steps"],
                                                     QUICK["quality_tokens"])
    train = to_run_config(compose_config(["task=train"]))
    changed = to_run_config(compose_config(["task=train", "task.repeats=9", "task.quick=true"]))
    assert config_hash(train) == config_hash(changed)


def test_fixed_batches_are_full_and_unpadded() -> None:
    from runner.data import Example

    examples = [Example(tuple(range(1, 8)), tuple(range(1, 8)))] * 3  # 21 tokens, cycled
    out = fixed_batches(examples, count=2, batch_size=3, seq_len=5)
    assert [tuple(b.input_ids.shape) for b in out] == [(3, 5), (3, 5)]
    assert all(int(b.attention_mask.sum()) == 15 for b in out)
    assert all((b.labels[:, 0] == -100).all() and b.n_tokens == 12 for b in out)


def test_quick_runs_only_the_summary_arms_and_prints_the_line(tmp_path: Path) -> None:
    _, stdout, row = _run_bench(tmp_path, ["task=bench", "model=tiny_llama", "hardware.threads=1",
                                           "task.quick=true", "data.max_examples=120"])
    assert LAST_LINE.fullmatch(stdout.rstrip("\n").splitlines()[-1])
    assert {t["arm"] for t in row["throughput"]} == {a.name for a in ARMS
                                                     if a.quick and a.throughput}
    assert {q["arm"] for q in row["quality"]} == {"adamw", "derived_matched_mass"}
    assert row["quality_target"]["source"] == "adamw"  # no grid in quick: the best baseline
    s = row["settings"]
    assert (s["repeats"], s["steps"], s["quality_tokens"]) == (
        QUICK["repeats"], QUICK["steps"], QUICK["quality_tokens"])
    for q in row["quality"]:  # evaluated before and after training only
        assert len(q["curve"]) == 2
