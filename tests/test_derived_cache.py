"""The derived set-up's cache (runner.derived.cache): a warm cache gives the set-up of a cold
one bit for bit without recomputing the cached steps; any change to the weights is another key;
an unreadable entry is recomputed after one warning line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from support import compose_config

import geometry
from geometry.derivations import analyze_layer, derive_from_layers
from runner.app import run_job
from runner.config.load import to_run_config
from runner.data import load_splits
from runner.derived import setup as derived_setup
from runner.derived.cache import CACHE_DIR, RECORDS, TENSORS
from runner.derived.setup import setup_derived
from runner.derived.torch_ops import FactoredAdapters, TorchOps
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path

FAST = ["+experiment=quickstart", "task=train", "hardware.threads=1", "trainer=derived",
        "budget.max_tokens=800", "budget.eval_every=4", "budget.eval_examples=8",
        "data.max_examples=60", "model=tiny_llama"]


def test_derive_from_layers_is_derive_hyperparameters() -> None:
    """The records rebuilt from per-matrix geometry equal derive_hyperparameters' own."""
    rng = np.random.default_rng(0)
    weights = {f"m{i}": rng.standard_normal((24 + 8 * i, 16)) * (1 + i) for i in range(4)}
    options = {"n_train": 40, "batches_per_epoch": 10, "dtype_eps": 2.0 ** -23}
    direct = geometry.derive_hyperparameters(weights, **options)
    rebuilt = derive_from_layers((analyze_layer(n, w, n_train=40, dtype_eps=2.0 ** -23)
                                  for n, w in weights.items()), **options)
    assert rebuilt == direct
    assert json.dumps(rebuilt.to_dict()) == json.dumps(direct.to_dict())


def _inputs(runs_dir: Path, extra: tuple[str, ...] = ()):
    cfg = to_run_config(compose_config([*FAST, *extra, f"runs_dir={runs_dir}"]))
    loaded = load_model(cfg.model)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    return cfg, loaded, splits, loaded.tokenizer.pad_token_id


def _setup(runs_dir: Path, extra: tuple[str, ...] = (), edit=None, use_cache: bool = True):
    """One set-up on a freshly loaded tiny_llama; what it derived, as comparable values."""
    cfg, loaded, splits, pad = _inputs(runs_dir, extra)
    if edit is not None:
        edit(loaded.model)
    if use_cache:
        s = setup_derived(cfg, loaded, splits, pad, None)
    else:
        s = derived_setup.setup(cfg, TorchOps(loaded.model), splits, pad)
    state = s.trainer.ops.save_adapters()
    s.trainer.ops.detach()
    return {"cache": s.cache, "phases": s.phase_seconds, "state": state,
            "derived": json.dumps(s.derived.to_dict(), sort_keys=True),
            "noise": s.noise, "batch": s.trainer.batch_size}


def _assert_same_setup(a: dict, b: dict) -> None:
    assert a["derived"] == b["derived"]
    assert a["noise"] == b["noise"] and a["batch"] == b["batch"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:  # bitwise: torch.equal on the same dtype
        assert a["state"][k].dtype == b["state"][k].dtype and torch.equal(a["state"][k],
                                                                         b["state"][k]), k


def _refuse_recomputation(mp: pytest.MonkeyPatch) -> None:
    """Make every cached step fail if it is computed instead of read."""
    def refuse(*args, **kwargs):
        raise AssertionError("a cached set-up step was recomputed")

    mp.setattr(derived_setup, "derive", refuse)
    mp.setattr(TorchOps, "residual_scales", refuse)
    mp.setattr(FactoredAdapters, "_frames", staticmethod(refuse))
    mp.setattr(TorchOps, "example_s_grads", refuse)


def test_a_warm_cache_gives_the_cold_setup_bitwise(tmp_path: Path) -> None:
    """Seed 1 after seed 0 reads every seed-independent step; its set-up equals seed 1's
    without a cache, and the steps it read cost nothing (they are not run)."""
    runs = tmp_path / "runs"
    cold = _setup(runs, ("seed=0",))
    assert cold["cache"] == "miss"
    assert len(list((runs / CACHE_DIR).iterdir())) == 4  # weights, scales, frames, probe
    uncached = _setup(tmp_path / "other", ("seed=1",), use_cache=False)
    assert uncached["cache"] == "off"
    with pytest.MonkeyPatch.context() as mp:
        _refuse_recomputation(mp)
        warm = _setup(runs, ("seed=1",))
    assert warm["cache"] == "hit"
    _assert_same_setup(warm, uncached)
    assert warm["phases"]["attach"] < uncached["phases"]["attach"]


def test_a_random_start_draws_its_frames_every_time(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _setup(runs, ("trainer.init=random",))
    assert len(list((runs / CACHE_DIR).iterdir())) == 2  # no frames entry, no probe entry
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derived_setup, "derive", lambda *a, **k: pytest.fail("recomputed"))
        again = _setup(runs, ("trainer.init=random", "seed=3"))
    assert again["cache"] == "hit"


def test_the_noise_probe_is_the_same_for_every_seed(tmp_path: Path) -> None:
    """Row 8 draws its dropout masks from the probe's own seed: two seeds measure the same
    noise scale without a cache (so a cached one is theirs too). The masks matter: the probe
    under another seed of its own measures another."""
    a = _setup(tmp_path / "a", ("seed=0",), use_cache=False)
    b = _setup(tmp_path / "b", ("seed=3",), use_cache=False)
    assert a["noise"] == b["noise"] and a["batch"] == b["batch"]
    cfg, loaded, splits, pad = _inputs(tmp_path / "c")
    ops = TorchOps(loaded.model)
    derived_setup.setup(cfg, ops, splits, pad)  # (derived: S stays 0, where the probe runs)
    other = derived_setup.measure_noise_scale(ops, splits.train, pad, len(splits.train),
                                              cfg.trainer.noise_examples,
                                              cfg.trainer.micro_batch, seed=1)
    assert other.b_simple != a["noise"].b_simple


def _probe_on_the_runs_stream(self, examples, pad_id, micro_batch, seed):
    """The probe as it was before it had a seed of its own: drawing from the run's generator."""
    from runner.data import collate
    from runner.derived.torch_ops import per_example_s_grads

    probe = sorted(examples, key=lambda ex: len(ex.input_ids))
    return torch.cat([per_example_s_grads(self.model, self.adapters,
                                          collate(probe[i:i + micro_batch], pad_id=pad_id))[0]
                      for i in range(0, len(probe), micro_batch)])


def _generator_after_setup(runs: Path, seed: int, edit=None, old_probe: bool = False):
    """(torch's generator state after a set-up at ``seed``, its noise scale, cache outcome)."""
    cfg, loaded, splits, pad = _inputs(runs, (f"seed={seed}",))
    if edit is not None:
        edit(loaded.model)
    with pytest.MonkeyPatch.context() as mp:
        if old_probe:
            mp.setattr(TorchOps, "example_s_grads", _probe_on_the_runs_stream)
        s = setup_derived(cfg, loaded, splits, pad, None)
    state = torch.get_rng_state()
    s.trainer.ops.detach()
    return state, s.noise, s.cache


@pytest.mark.parametrize("seed", [0, 3])
def test_the_probe_advances_the_runs_generator_as_if_it_drew_from_it(seed: int,
                                                                     tmp_path: Path) -> None:
    """The probe runs on its own stream, then replays its draws on the run's: after the set-up
    the run's generator is where the probe drawing from it left it, so training draws the same
    masks; read back from the cache, alike. At seed 0, the probe's own seed, the noise scale
    is the old one too; at seed 3 it is seed 0's."""
    old, old_noise, _ = _generator_after_setup(tmp_path / "old", seed, old_probe=True)
    cold, noise, cache = _generator_after_setup(tmp_path / "runs", seed)
    warm, warm_noise, warm_cache = _generator_after_setup(tmp_path / "runs", seed)
    assert (cache, warm_cache) == ("miss", "hit")
    assert torch.equal(cold, old) and torch.equal(warm, old)
    assert warm_noise == noise
    assert (noise == old_noise) == (seed == 0)


def test_the_probe_records_no_draw_of_a_recomputed_block(tmp_path: Path) -> None:
    """hardware.recompute reruns each block in the backward, its adapters' hooks and dropout
    included, under the random state it saved: those draws advance nothing and are not
    recorded, so the replay is the same with and without it."""
    from runner.models.loading import enable_recompute

    out = {}
    for recompute in (False, True):
        cfg, loaded, splits, pad = _inputs(tmp_path / str(recompute))
        if recompute:
            enable_recompute(loaded.model)
        ops = TorchOps(loaded.model)
        derived_setup.setup(cfg, ops, splits, pad)
        out[recompute] = ops.probe_draws, torch.get_rng_state()
    assert out[False][0] and out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])


def test_a_model_that_draws_is_probed_on_the_runs_generator(tmp_path: Path) -> None:
    """A model whose own forward draws (attention dropout here) cannot have those draws
    replayed: its probe draws from the run's generator, as before, and is never cached."""
    def attention_dropout(model) -> None:
        model.config.attention_dropout = 0.1
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1

    old, old_noise, _ = _generator_after_setup(tmp_path / "old", 3, attention_dropout,
                                               old_probe=True)
    for _ in range(2):
        state, noise, _ = _generator_after_setup(tmp_path / "runs", 3, attention_dropout)
        assert torch.equal(state, old) and noise == old_noise
    assert not any(json.loads((e / RECORDS).read_text())["step"] == "noise_scale"
                   for e in (tmp_path / "runs" / CACHE_DIR).iterdir())


def test_one_changed_weight_misses_the_cache(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _setup(runs)

    def nudge(model) -> None:  # the next float after one element of one decoder Linear
        with torch.no_grad():
            w = model.model.layers[0].mlp.down_proj.weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))

    changed = _setup(runs, edit=nudge)
    assert changed["cache"] == "miss"
    assert len(list((runs / CACHE_DIR).iterdir())) == 8


def test_an_unreadable_entry_is_recomputed_after_one_warning(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    cold = _setup(runs)
    entries = sorted((runs / CACHE_DIR).iterdir())
    frames = next(e for e in entries if (e / TENSORS).exists())
    blob = bytearray((frames / TENSORS).read_bytes())
    blob[-1] ^= 0x01  # one bit of one frame
    (frames / TENSORS).write_bytes(bytes(blob))
    other = next(e for e in entries if not (e / TENSORS).exists())
    text = (other / RECORDS).read_text()
    (other / RECORDS).write_text(text[: len(text) // 2])  # a partial entry
    with caplog.at_level(logging.WARNING, logger="runner.derived.cache"):
        again = _setup(runs)
    warnings = [r for r in caplog.records if r.name == "runner.derived.cache"]
    assert len(warnings) == 2 and all("recomputing" in r.getMessage() for r in warnings)
    assert again["cache"] == "partial"
    _assert_same_setup(again, cold)
    assert _setup(runs)["cache"] == "hit"  # the recomputed entries were stored again


@pytest.mark.parametrize("reading", ["derived", "derived_tail_start"])
def test_trial_rows_record_the_cache_and_stay_bitwise(reading: str, tmp_path: Path) -> None:
    """Seed 0 trained after seed 1 filled the cache records the same trial as seed 0 trained
    cold, its stopping certificate included (one short prompt at a time: the products whose
    kernel follows the frames' strides); the row says which set-up read the cache."""
    def row(seed: int, runs: str, results: str) -> dict:
        return run_job(compose_config([*FAST, f"trainer={reading}", f"seed={seed}",
                                       f"runs_dir={tmp_path / runs}",
                                       f"results_dir={tmp_path / results}"]))

    cold = row(0, "runs-a", "results-a")
    assert row(1, "runs-b", "results-b")["metrics"]["setup_cache"] == "miss"
    warm = row(0, "runs-b", "results-c")
    assert cold["metrics"]["setup_cache"] == "miss" and warm["metrics"]["setup_cache"] == "hit"
    assert warm["derived"] == cold["derived"]
    assert warm["config_hash"] == cold["config_hash"]
    assert cold["certificate"]["criteria"] and warm["certificate"] == cold["certificate"]
    assert _untimed(warm["curves"]) == _untimed(cold["curves"])
    assert (_untimed(warm["metrics"], {"setup_cache", "peak_rss_mb"})
            == _untimed(cold["metrics"], {"setup_cache", "peak_rss_mb"}))


def test_frames_read_back_with_their_computed_strides(tmp_path: Path) -> None:
    """A rank-1 frame computed as a column of a column-major Q keeps those strides when read
    from the cache (the kernel of a product follows its operands' strides)."""
    def strides(runs: Path) -> dict:
        cfg, loaded, splits, pad = _inputs(runs, ("trainer=derived_tail_start",))
        s = setup_derived(cfg, loaded, splits, pad, None)
        out = {n: (u.stride(), v.stride()) for n, (u, _, v) in s.trainer.ops.host_usv().items()}
        out["tails"] = {n: (u.stride(), v.stride())
                        for n, (u, _, v) in s.trainer.ops.host_tails().items()}
        s.trainer.ops.detach()
        return s.cache, out

    cache_cold, cold = strides(tmp_path / "runs")
    cache_warm, warm = strides(tmp_path / "runs")
    assert (cache_cold, cache_warm) == ("miss", "hit")
    assert warm == cold
    assert any(u[1] != 1 for n, (u, _) in cold.items() if n != "tails")  # a rank-1 column


def _untimed(value, drop: frozenset | set = frozenset()):
    """``value`` without its clock readings (keys naming seconds or a rate per second) and the
    keys in ``drop``."""
    if isinstance(value, dict):
        return {k: _untimed(v, drop) for k, v in value.items()
                if "seconds" not in k and "per_second" not in k and k not in drop}
    if isinstance(value, list):
        return [_untimed(v, drop) for v in value]
    return value


@pytest.mark.parametrize("hardware", ["jax_cpu", "mlx"])
def test_array_backends_read_their_own_entries_bitwise(hardware: str, tmp_path: Path) -> None:
    """MLX and JAX store and read their own frames (numpy through safetensors) bit for bit."""
    pytest.importorskip("jax" if hardware == "jax_cpu" else "mlx.core")
    from runner.hardware import setup_hardware

    runs, seen = tmp_path / "runs", []
    for _ in range(2):
        cfg, loaded, splits, pad = _inputs(runs, (f"hardware={hardware}",
                                                  "trainer.certificate=false"))
        setup_hardware(cfg.hardware)
        s = setup_derived(cfg, loaded, splits, pad, None)
        seen.append((s.cache, json.dumps(s.derived.to_dict(), sort_keys=True), s.noise,
                     {n: [np.asarray(x) for x in t] for n, t in s.trainer.ops.host_usv().items()}))
    (cache0, derived0, noise0, usv0), (cache1, derived1, noise1, usv1) = seen
    assert (cache0, cache1) == ("miss", "hit")
    assert derived0 == derived1 and noise0 == noise1
    assert usv0.keys() == usv1.keys()
    assert all(np.array_equal(a, b) for n in usv0 for a, b in zip(usv0[n], usv1[n], strict=True))
