"""The derived trainer's readings (docs/derivations.md, "Readings") on real (tiny) models: each
reading's invariants on the model it trains (Weyl's bound on the real change of every adapted
weight, orthonormal frames, the model unchanged at step 0 where the reading says so, frames that
move), and end to end: the exported PEFT adapter is the trained model, and the trial row carries
the step telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import compose_config, logits_of, probe_ids

from runner.app import run_job
from runner.config.load import to_run_config
from runner.data import batches, load_splits
from runner.derived import READINGS, is_derived
from runner.derived import run as derived_task
from runner.derived.setup import setup_derived
from runner.derived.torch_ops import candidate_linears
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path

NEW = ["derived_uniform", "derived_tail_start", "derived_matched_mass", "derived_seed_code"]
FROM_TAIL = ["derived_tail_start", "derived_matched_mass"]
FAST = ["+experiment=quickstart", "task=train", "hardware.threads=1", "budget.max_tokens=600",
        "budget.eval_every=3", "budget.eval_examples=8", "data.max_examples=60"]





def _set_up(reading: str, model: str = "tiny_llama"):
    """A reading's trainer on a fresh tiny model, set up (no step taken)."""
    cfg = to_run_config(compose_config([*FAST, f"trainer={reading}", f"model={model}"]))
    loaded = load_model(cfg.model)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    return cfg, loaded, splits


@torch.no_grad()
def _real_changes(model) -> dict[str, torch.Tensor]:
    """dW of every adapted Linear as the hooked model computes it: the Linear applied to the
    identity (eval mode: no dropout) minus the plain W (out x in). Not the exported factors:
    what the forward pass really adds."""
    out = {}
    for name, lin in candidate_linears(model).items():
        eye = torch.eye(lin.in_features, dtype=lin.weight.dtype)
        out[name] = (lin(eye) - eye @ lin.weight.T).T
    return out


def test_every_reading_is_registered() -> None:
    assert set(NEW) | {"derived"} == set(READINGS)
    assert all(is_derived(r) for r in READINGS) and not is_derived("adamw")


@pytest.mark.parametrize("reading", NEW)
def test_reading_invariants_on_the_real_model(reading: str) -> None:
    """Two steps of the reading on tiny Llama: ||dW||_2 <= sigma_k for every adapted matrix
    (the spectral norm of the real change), orthonormal frames, the start as the reading says,
    and frames that move."""
    torch.manual_seed(0)
    cfg, loaded, splits = _set_up(reading)
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    ids = probe_ids(model)
    model.eval()
    base = logits_of(model, ids)
    setup = setup_derived(cfg, loaded, splits, pad_id, None)
    trainer, rule = setup.trainer, READINGS[reading]
    specs = trainer.adapters.specs
    trainer.eval_mode()
    start_logits = logits_of(model, ids)
    u0 = {n: u.clone() for n, (u, _, _) in trainer.ops.host_usv().items()}

    # 1. The start: the model is unchanged, or (the seed's code) it is not.
    if rule.nb_lora:
        assert not torch.allclose(start_logits, base, atol=1e-4)
    elif reading in FROM_TAIL:
        # the adapter and the frozen tail cancel up to float32 rounding of two products
        torch.testing.assert_close(start_logits, base, atol=2e-5, rtol=0)
        assert all(float(s.abs().min()) > 0 for _, s, _ in trainer.ops.host_usv().values())
    else:
        assert torch.equal(start_logits, base)

    # 2. Two steps.
    for batch, _ in zip(batches(splits.train, trainer.batch_size, seed=0, epoch=0,
                                pad_id=pad_id), range(2), strict=False):
        log = trainer.step(batch)
        assert {"frame_motion_u", "frame_motion_v", "s_at_bound", "delta_step_spread"} <= set(log.extra)
    trainer.eval_mode()

    # 3. Weyl on the real change of every adapted weight (float64 spectral norm of a float32
    #    difference: 1e-5 relative covers its rounding).
    for name, dw in _real_changes(model).items():
        norm = float(torch.linalg.matrix_norm(dw.double(), ord=2))
        assert norm <= specs[name].sigma_k * (1 + 1e-5) + 1e-6, name

    # 4. Orthonormal frames ([A^T; B^T] for NB-LoRA), to float32 rounding.
    for u, _, v in trainer.ops.host_usv().values():
        frames = [torch.cat([v, u])] if rule.nb_lora else [u, v]
        for x in frames:
            eye = torch.eye(x.shape[1], dtype=x.dtype)
            torch.testing.assert_close(x.T @ x, eye, atol=1e-5, rtol=0)

    # 5. The frames moved (all but derived_uniform have a frame gradient from step 0).
    motion = sum(float((u - u0[n]).norm()) for n, (u, _, _) in trainer.ops.host_usv().items())
    if reading != "derived_uniform":
        assert motion > 0


@pytest.fixture(scope="module", params=NEW)
def reading_run(request, tmp_path_factory):
    """One short run per reading on tiny Llama; the trainer's own model is probed just before
    export."""
    tmp = tmp_path_factory.mktemp(request.param)
    overrides = [*FAST, f"trainer={request.param}", "model=tiny_llama"]
    own: dict[str, torch.Tensor] = {}
    export_peft = derived_task.export_peft

    def probe_then_export(base_model, trainer, derived):
        trainer.eval_mode()
        own["logits"] = logits_of(base_model, probe_ids(base_model))
        return export_peft(base_model, trainer, derived)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derived_task, "export_peft", probe_then_export)
        row = run_job(compose_config([*overrides, f"results_dir={tmp}/results",
                                      f"runs_dir={tmp}/runs"]))
    return request.param, overrides, row, own


def test_reading_peft_export_gives_the_trainers_logits(reading_run) -> None:
    """The exported adapter on the ORIGINAL base model (the tail start: rank 2r with its frozen
    tail) gives the logits the trainer's hooked model gave."""
    from peft import PeftModel

    reading, overrides, row, own = reading_run
    base = load_model(to_run_config(compose_config(overrides)).model).model
    plain = logits_of(base, probe_ids(base))
    reloaded = PeftModel.from_pretrained(base, row["adapter_path"]).eval()
    ours = logits_of(reloaded, probe_ids(base))
    assert not torch.allclose(ours, plain, atol=1e-6)  # the adapter changed the model
    # Same float32 products in another order (PEFT: B (A x) with B precomputed).
    torch.testing.assert_close(ours, own["logits"], atol=1e-5, rtol=0)
    if reading in FROM_TAIL:
        config = json.loads((Path(row["adapter_path"]) / "adapter_config.json").read_text())
        assert all(v % 2 == 0 for v in config["rank_pattern"].values())
        assert config["rank_pattern"] == config["alpha_pattern"]  # scaling 1


def test_reading_rows_carry_the_telemetry(reading_run) -> None:
    reading, _, row, _ = reading_run
    m, steps = row["metrics"], row["curves"]["steps"]
    assert all({"frame_motion_u", "frame_motion_v", "s_at_bound", "delta_step_min",
                "delta_step_median", "delta_step_max", "delta_step_spread"} <= set(s)
               for s in steps)
    assert m["frame_motion"] > 0 and 0 <= m["s_at_bound_fraction"] < 1
    assert m["delta_step_spread"] >= 1
    assert all("seconds" in e for e in row["curves"]["eval"])
    assert row["curves"]["eval"][-1]["seconds"] > 0
    if reading == "derived_matched_mass":
        assert row["hyperparameters"]["matched_steps"] >= 1
        assert all(s["weyl_ratio"] <= 1 + 1e-9 for s in steps)
    else:  # one step size for every matrix: no spread
        assert m["delta_step_spread"] == 1
