"""One derived run on any backend: set up -> train (checkpoints, certificate) -> export."""

from __future__ import annotations

from rich.console import Console

from runner.derived.certificate import certificate_monitor
from runner.derived.export import export_peft
from runner.derived.setup import enum_value, setup_derived
from runner.training.checkpoint import Checkpoint
from runner.training.loop import train_loop
from runner.trial import TrainOutcome, config_hash


def run_derived(cfg, loaded, splits, pad_id: int, console: Console) -> TrainOutcome:
    tcfg, backend = cfg.trainer, enum_value(cfg.hardware.backend)

    # 1-5. Derive, calibrate, attach, measure.
    setup = setup_derived(cfg, loaded, splits, pad_id, console)
    trainer, derived, noise = setup.trainer, setup.derived, setup.noise
    records = derived.records

    # 6. Train with MASS steps; stop on the certificate or the token budget.
    monitor = certificate_monitor(cfg, trainer, splits, pad_id) if tcfg.certificate else None
    checkpoint = Checkpoint.for_run(cfg.runs_dir, config_hash(cfg),
                                    stateful={"certificate": monitor} if monitor else None)
    model = loaded.model if backend == "torch" else None
    pullback_start = None
    if trainer.rule.nb_lora:  # the seed's pullback metric at every evaluation (its claim)
        trainer.pullback_every = cfg.budget.eval_every
        pullback_start = trainer.pullback()  # the start: set-up is deterministic, also on resume
    result = train_loop(model, trainer, splits, cfg.budget, seed=cfg.seed, pad_id=pad_id,
                        console=console, on_eval=monitor.on_eval if monitor else None,
                        checkpoint=checkpoint)
    pullback = pullback_points(pullback_start, result, trainer) if pullback_start else None

    # 7. Export as plain PEFT LoRA (B = c U diag(S), A = V^T, alpha = r).
    trainer.eval_mode()
    ranks = trainer.adapter_effective_ranks()
    peft_model = export_peft(loaded.model, trainer, derived)
    history = monitor.history if monitor else []
    hyperparameters = {"init": enum_value(tcfg.init), "batch_size": trainer.batch_size,
                       "micro_batch": tcfg.micro_batch,
                       "mass_ceiling": records.mass_ceiling.value,
                       "epsilon_floor": records.epsilon_floor.value}
    if trainer.matched_steps is not None:
        hyperparameters["matched_steps"] = trainer.matched_steps
    if backend != "torch":
        hyperparameters["backend"] = backend
    return TrainOutcome(
        model=peft_model, result=result, hyperparameters=hyperparameters,
        extra_metrics={"derive_seconds": setup.derive_seconds,
                       "setup_seconds": setup.setup_seconds, "setup_cache": setup.cache,
                       "batch_size": trainer.batch_size,
                       "noise_b_simple": noise.b_simple,
                       "max_orth_error": max((s.get("orth_error", 0.0)
                                              for s in result.step_logs), default=0.0),
                       "adapter_effective_rank_mean": sum(ranks.values()) / max(len(ranks), 1),
                       **telemetry_metrics(result.step_logs),
                       **({"pullback": pullback} if pullback else {})},
        derived=derived.to_dict(),
        certificate=history[-1] if history else None,
        step_table=result.step_logs,
    )


def telemetry_metrics(step_logs: list[dict]) -> dict[str, float]:
    """The run's step telemetry in three numbers: ``frame_motion`` the frames' path length
    (sum over steps of ||dU||_F + ||dV||_F), ``s_at_bound_fraction`` the fraction of S on a
    bound after the last step, ``delta_step_spread`` the median over steps of the max/min
    effective step on dW across matrices."""
    logs = [s for s in step_logs if "frame_motion_u" in s]
    if not logs:
        return {}
    spreads = sorted(s["delta_step_spread"] for s in logs)
    return {"frame_motion": sum(s["frame_motion_u"] + s["frame_motion_v"] for s in logs),
            "s_at_bound_fraction": logs[-1]["s_at_bound"],
            "delta_step_spread": spreads[len(spreads) // 2]}


def pullback_points(start: dict, result, trainer) -> list[dict]:
    """metrics.pullback: {step, median_deviation, max_deviation} at step 0, every evaluation
    step (logged by the trainer) and the last step (measured here when it was not one)."""
    def point(step: int, log: dict) -> dict:
        return {"step": step, "median_deviation": log["pullback_median_deviation"],
                "max_deviation": log["pullback_max_deviation"]}

    points = [point(0, start)] + [point(s["step"], s) for s in result.step_logs
                                  if "pullback_median_deviation" in s]
    if points[-1]["step"] != result.steps:
        points.append(point(result.steps, trainer.pullback()))
    return points
