"""The bench's arithmetic (time to target, the honest reference, memory readings) and a smoke
test of its stock PEFT + AdamW reference arm on the tiny Llama."""

from __future__ import annotations

import math
import multiprocessing

import pytest
import torch
from support import compose_config

from runner.config.load import to_run_config
from runner.tasks.bench import fixed_batches
from runner.tasks.bench_process import parse_vm_hwm_mb, vm_hwm_mb, whole_process_peak
from runner.tasks.bench_reference import StockPeftTrainer
from runner.tasks.bench_summary import (
    best_reference,
    phase_peaks,
    quality_target,
    summarize,
    time_to_target,
)

CURVE = [{"tokens": 0, "seconds": 0.0, "val_loss": 3.0},
         {"tokens": 100, "seconds": 10.0, "val_loss": 2.0},
         {"tokens": 200, "seconds": 30.0, "val_loss": 1.0}]


def test_time_to_target_interpolates_between_evaluations() -> None:
    # 1.5 lies halfway between the second and third points: 150 tokens, 20 s
    assert time_to_target(CURVE, 1.5) == {"tokens": 150.0, "seconds": 20.0}
    assert time_to_target(CURVE, 2.0) == {"tokens": 100.0, "seconds": 10.0}  # hit exactly
    assert time_to_target(CURVE, 3.5) == {"tokens": 0.0, "seconds": 0.0}  # already there
    assert time_to_target(CURVE, 0.5) is None  # never within the budget


def test_time_to_target_takes_the_first_crossing_and_skips_nan() -> None:
    curve = [*CURVE[:2], {"tokens": 150, "seconds": 15.0, "val_loss": math.nan},
             {"tokens": 200, "seconds": 20.0, "val_loss": 2.5},
             {"tokens": 300, "seconds": 30.0, "val_loss": 1.0}]
    # 2.5 is first reached between 0 and 100 tokens (at 50), not at 200
    assert time_to_target(curve, 2.5) == {"tokens": 50.0, "seconds": 5.0}
    # 1.5 is first reached two thirds of the way from (200, 2.5) to (300, 1.0)
    assert time_to_target(curve, 1.5) == pytest.approx({"tokens": 200 + 100 * 2 / 3,
                                                        "seconds": 20 + 10 * 2 / 3})
    # 1.95, reached first at 200 tokens right after the NaN point: read there, not interpolated
    curve[3]["val_loss"] = 1.9
    assert time_to_target(curve, 1.95) == {"tokens": 200.0, "seconds": 20.0}


def _q(arm, trainer, final):
    return {"arm": arm, "trainer": trainer, "val_loss_final": final}


def test_quality_target_prefers_the_grid_then_the_best_baseline() -> None:
    arms = [_q("adamw", "adamw", 2.0), _q("prodigy", "prodigy", 1.8),
            _q("derived_matched_mass", "derived_matched_mass", 1.5)]
    # a derived reading never sets the target, however low its loss
    assert quality_target(arms) == {"val_loss": 1.8, "source": "prodigy"}
    grid = _q("adamw_grid", "adamw_grid", 1.9)
    assert quality_target([*arms, grid]) == {"val_loss": 1.9, "source": "adamw_grid"}
    with pytest.raises(ValueError, match="no baseline"):
        quality_target(arms[2:])


def _t(tok_s, peak, step, setup=None):
    return {"tok_s_median": tok_s, "process_peak_mb": peak, "train_peak_mb": peak / 2,
            "peak_mb": peak, "step_seconds_median": step, "setup_seconds": setup,
            "derive_seconds": setup and setup / 4, "mfu": 0.1}


def test_summary_takes_the_reference_least_flattering_per_metric() -> None:
    by_arm = {"adamw": _t(100.0, 900.0, 1.2), "peft_stock": _t(125.0, 1000.0, 1.0),
              "derived_matched_mass": _t(100.0, 1800.0, 1.5, setup=5.0)}
    assert best_reference(by_arm, "tok_s_median") == "peft_stock"
    assert best_reference(by_arm, "process_peak_mb", best=min) == "adamw"
    s = summarize(by_arm)
    assert (s["reference"], s["mem_reference"], s["step_reference"]) == (
        "peft_stock", "adamw", "peft_stock")
    assert s["tok_s_ratio"] == pytest.approx(0.8)  # 100 / 125, not 100 / 100
    assert s["mem_ratio"] == pytest.approx(2.0)  # 1800 / 900
    assert s["derive_steps"] == pytest.approx(5.0)  # 5 s over the 1.0 s step
    assert "derive_steps_first" not in s  # a row that set up once
    by_arm["derived_matched_mass"]["setup_seconds_first"] = 8.0
    assert summarize(by_arm)["derive_steps_first"] == pytest.approx(8.0)
    assert s["vs_adamw_tok_s_ratio"] == pytest.approx(1.0)
    # without the stock arm (runs that lack it) the project's baseline is the reference
    del by_arm["peft_stock"]
    assert summarize(by_arm)["reference"] == "adamw"
    with pytest.raises(ValueError, match="no reference arm"):
        best_reference({"derived_matched_mass": by_arm["derived_matched_mass"]}, "tok_s_median")


def test_vm_hwm_is_parsed_in_mb() -> None:
    status = "Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    assert parse_vm_hwm_mb(status) == 2.0
    assert parse_vm_hwm_mb("Name:\tpython\n") is None
    with pytest.raises(ValueError, match="unit"):
        parse_vm_hwm_mb("VmHWM:\t 2 MB\n")


def test_whole_process_peak_spans_the_phases() -> None:
    assert whole_process_peak([900.0, None, 1500.0, 1200.0]) == 1500.0
    with pytest.raises(ValueError):
        whole_process_peak([None])


def _allocate_and_read(mb: int, queue) -> None:
    before = vm_hwm_mb()
    block = torch.ones(mb * 2**20 // 4)  # touched: resident
    queue.put((before, vm_hwm_mb(), float(block[0])))


@pytest.mark.skipif(vm_hwm_mb() is None, reason="needs /proc/self/status (Linux)")
def test_vm_hwm_sees_a_child_allocation() -> None:
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_allocate_and_read,
                                                          args=(200, queue))
    child.start()
    before, after, _ = queue.get(timeout=120)
    child.join()
    assert after - before >= 190  # 200 MB touched (allocator slack: 10 MB)


def test_stock_arm_trains_the_tiny_model() -> None:
    from runner.tasks.bench import _load

    cfg = to_run_config(compose_config(["task=bench", "model=tiny_llama", "hardware.threads=1",
                                        "data.max_examples=60"]))
    loaded, splits = _load(cfg)
    trainer = StockPeftTrainer(loaded.model, lr=1e-2, batch_size=2)
    cfg_peft = trainer.model.peft_config["default"]
    assert (cfg_peft.r, cfg_peft.lora_alpha, cfg_peft.lora_dropout) == (8, 8, 0.0)  # PEFT's
    assert sorted(cfg_peft.target_modules) == ["q_proj", "v_proj"]
    assert trainer.adapters == "stock PEFT: r=8 alpha=8 dropout=0.0 on q/v"
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight"))
               for n, p in trainer.model.named_parameters() if p.requires_grad)
    batch = fixed_batches(splits.train, 1, 2, 32)[0]
    losses = [trainer.step(batch).loss for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the same batch five times: AdamW fits it


def test_phase_peaks_read_load_setup_and_steps() -> None:
    row = {"load_peak_mb": 981.2, "setup_peak_mb": 2433.6, "steps_peak_mb": 2692.9}
    assert phase_peaks(row) == "981 / 2434 / 2693"
    assert phase_peaks({**row, "setup_peak_mb": None}) == "981 / - / 2693"  # not read apart
