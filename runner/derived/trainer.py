"""The derived trainer, once for every backend: Riemannian SGD on U, V (Cayley retraction) and a
reading's projected step on S, with MASS step sizes (SEED-SPEC rows 1, 3, 4, 10).

Each target matrix W gets an adapter dW = c U diag(S) V^T: U (out x r) and V (in x r) with
orthonormal columns, starting at W's singular vectors just past its structural rank, S = 0 so
the model is unchanged at step 0, and c the block's residual scale (row 15). One step:

    1. forward/backward on the batch (micro-batched to the derived batch size);
    2. eta = MASS(loss, ||g||) = min(ceiling, SPS, Weyl)                    (row 1)
    3. U, V <- Cayley retraction of -eta * grad on the Stiefel manifold      (row 3, no momentum)
    4. S <- the reading's step (runner.derived.step)                        (rows 4, 10)

What differs between torch, MLX and JAX (forward/backward, the update's arrays, checkpoint
conversion) is the backend's ops object (runner.derived.ops).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

import geometry
from geometry.readings import (
    BINDING_TERMS,
    per_matrix_mass_ceiling,
    per_matrix_mass_step,
    tail_start_peft_factors,
)
from runner.derived.spec import check_setup
from runner.training.loop import StepLog


class DerivedTrainer:
    def __init__(self, ops, rule, derived, batch_size: int, micro_batch: int, *,
                 ceiling: float, floor: float, matched_steps: int | None = None):
        self.ops, self.rule, self.derived = ops, rule, derived
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.ceiling, self.floor = ceiling, floor
        self.sigma_k_min = float(derived.sigma_k_min)
        # derived_matched_mass: each matrix's ceiling, Weyl numerator and floor (adapters' order)
        self.matched_steps = matched_steps
        self.per_matrix = per_matrix_constants(derived, ops.adapters.specs, matched_steps) \
            if rule.per_matrix_mass else None
        self.steps = 0  # the backends' dropout keys are drawn from (seed, step)
        # The last update, kept when the certificate's curvature criterion reads it.
        self.keep_direction = False
        self.last_direction = None
        # derived_seed_code: log the pullback metric's deviation every this many steps (the
        # evaluation points; runner.derived.run sets it), None: never.
        self.pullback_every: int | None = None

    @property
    def adapters(self):
        return self.ops.adapters

    @property
    def params(self) -> list:
        return self.ops.params()

    def train_mode(self) -> None:
        self.ops.train_mode()

    def eval_mode(self) -> None:
        self.ops.eval_mode()

    def _forward_backward(self, batch, *, train: bool = True):
        return self.ops.forward_backward(batch, self.micro_batch, self.batch_size,
                                         step=self.steps, train=train)

    def step(self, batch) -> StepLog:
        # 1. Loss and gradients (micro-batched to the derived batch size).
        self.train_mode()
        loss, grads = self._forward_backward(batch)
        self.steps += 1
        grad_norm = self.ops.grad_norm(grads)
        loss_f, norm_f = float(loss), float(grad_norm)
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            return StepLog(loss=loss_f, extra={"grad_norm": norm_f})

        # 2. MASS step size (row 1; per matrix for derived_matched_mass): which term binds is
        #    logged.
        if self.per_matrix is not None:
            eta, mass_log = self._per_matrix_step(loss_f, grads)
        else:
            inputs = (loss_f, norm_f) if self.ops.mass_on_host else (loss, grad_norm)
            mass = geometry.mass_step_size(*inputs, self.sigma_k_min, self.ceiling, self.floor)
            eta = float(mass.step)
            mass_log = {"step_size": eta, "bound": mass.bound, "update_norm": eta * norm_f,
                        "weyl_bound": self.sigma_k_min}

        # 3-4. Retract U, V on their Stiefel manifolds; step S by the reading.
        direction, orth, s_ratio, telemetry = self.ops.update(
            grads, eta, self.rule, keep_direction=self.keep_direction)
        if direction is not None:
            self.last_direction = direction
        pullback = self.pullback() if self.pullback_every and \
            self.steps % self.pullback_every == 0 else {}
        return StepLog(loss=loss_f, extra={
            "grad_norm": norm_f, **mass_log,
            "orth_error": float(orth), "adapter_norm_ratio": float(s_ratio),
            **summarize_telemetry(telemetry, self.adapters.specs), **pullback,
        })

    def pullback(self) -> dict[str, float]:
        """derived_seed_code: median and max over adapters of ||P - I||_F / sqrt(r)."""
        devs = sorted(self.adapters.pullback_deviations())
        return {"pullback_median_deviation": float(np.median(devs)),
                "pullback_max_deviation": devs[-1]}

    def _per_matrix_step(self, loss_f: float, grads):
        """derived_matched_mass: every adapter's own MASS step (geometry.readings)."""
        pm = self.per_matrix
        norms = self.ops.adapter_grad_norms(grads)
        mass = per_matrix_mass_step(loss_f, norms, pm["sigma_k"], pm["ceiling"], pm["floor"],
                                    self.floor)
        steps = [float(x) for x in mass.step]
        weyl = max(e * float(g) / sk for e, g, sk in zip(steps, norms, pm["sigma_k"], strict=True))
        return steps, {
            "step_size": sorted(steps)[len(steps) // 2],  # the median adapter's step
            "step_size_min": min(steps), "step_size_max": max(steps),
            "bound": max(mass.counts, key=mass.counts.get),
            **{f"bound_{t}": mass.counts[t] for t in BINDING_TERMS},
            "update_norm": math.sqrt(sum((e * float(g)) ** 2 for e, g in zip(steps, norms,
                                                                              strict=True))),
            "weyl_ratio": weyl,  # max_W eta_W ||g_W|| / sigma_k,W <= 1 (Weyl, per matrix)
        }

    def example_losses(self, examples, batch_size: int, pad_id: int):
        """Per-example summed next-token CE and label counts, without dropout."""
        return self.ops.example_losses(examples, batch_size, pad_id)

    # -- what the stopping certificate asks (runner.derived.certificate) -------------------

    def generation_stats(self, prompts, new_tokens: int, pad_id: int) -> tuple[float, float]:
        return self.ops.generation_stats(prompts, new_tokens, pad_id)

    def curvature(self, val_batch) -> tuple[float, float]:
        """a = grad L_val . d and b = d^T H_val d along the last update d, by central
        differences of the validation gradient; NaN before the first step. The adapters end
        bitwise where they started."""
        d = self.last_direction
        if d is None:
            return math.nan, math.nan
        g0, g_plus, g_minus = self.ops.curvature_grads(val_batch, d, self.micro_batch,
                                                       self.batch_size)
        a = self.ops.dot(g0, d)
        b = self.ops.dot(self.ops.sub(g_plus, g_minus), d) / 2.0
        return a, b

    # -- checkpoints -------------------------------------------------------------------------

    def setup_summary(self) -> dict[str, float]:
        """What the set-up derived (recomputed on resume, so it must come out the same)."""
        summary = {"batch_size": self.batch_size, "micro_batch": self.micro_batch,
                   "ceiling": self.ceiling, "floor": self.floor, "sigma_k_min": self.sigma_k_min}
        if self.matched_steps is not None:
            summary["matched_steps"] = self.matched_steps
        return summary

    def state_dict(self) -> dict[str, Any]:
        """U, S, V, the last update and the step count as torch tensors; the set-up only as its
        summary, checked on resume."""
        d = self.last_direction
        return {"adapters": self.ops.save_adapters(),
                "last_direction": None if d is None else self.ops.save_direction(d),
                "steps": self.steps, "setup": self.setup_summary()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_setup(self.setup_summary(), state["setup"])
        self.ops.load_adapters(state["adapters"])
        d = state["last_direction"]
        self.last_direction = None if d is None else self.ops.load_direction(d)
        self.steps = int(state["steps"])

    # -- export ------------------------------------------------------------------------------

    def peft_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (lora_A (R x in), lora_B (out x R)): B = c U diag(S), A = V^T (R = r); for the
        tail start the change against the original W, B = [U diag(S~), -U_t diag(a)],
        A = [V^T; V_t^T] (R = 2r; geometry.readings.tail_start_peft_factors)."""
        out, tails = {}, self.ops.host_tails()
        for name, (u, s, v) in self.ops.host_usv().items():
            scale = self.ops.adapters.specs[name].scale
            if name in tails:
                b, a = tail_start_peft_factors(u, s, v, *tails[name])
                out[name] = (a.contiguous(), b.contiguous())
            else:
                out[name] = (v.T.contiguous(), (scale * u * s).contiguous())
        return out

    def peft_ranks(self) -> dict[str, int]:
        """The PEFT rank of each module (2r where the tail start exports its frozen tail)."""
        tails = self.ops.host_tails()
        return {name: spec.rank * (2 if name in tails else 1)
                for name, spec in self.ops.adapters.specs.items()}

    def adapter_effective_ranks(self) -> dict[str, float]:
        return {name: geometry.effective_rank(s.double().abs()) if float(s.abs().max()) > 0
                else 0.0 for name, (_, s, _) in self.ops.host_usv().items()}


def per_matrix_constants(derived, specs: dict, n_steps: int) -> dict[str, list[float]]:
    """sigma_k,W, the ceiling sigma_k,W / (sigma_max,W sqrt(N)) and the row-2 floor of every
    adapted matrix, in the adapters' order (geometry.readings.per_matrix_mass_ceiling)."""
    layers = {g.name: g for g in derived.layers}
    rows = [layers[name] for name in specs]
    sigma_k = [g.sigma_k for g in rows]
    ceiling = per_matrix_mass_ceiling(np.array(sigma_k), np.array([g.sigma_max for g in rows]),
                                      n_steps)
    return {"sigma_k": sigma_k, "ceiling": [float(c) for c in ceiling],
            "floor": [g.epsilon for g in rows]}


def summarize_telemetry(telemetry: dict | None, specs: dict) -> dict[str, float]:
    """The step's telemetry over every adapter: the frames' motion ||dU||_F, ||dV||_F (root of
    the sum of squares over adapters), the fraction of S entries on a bound of their box, and
    the effective step on dW of each matrix (min, median, max and their ratio, the spread)."""
    if not telemetry:
        return {}
    tel = {n: {k: float(getattr(t, k)) for k in ("frame_motion_u", "frame_motion_v",
                                                 "at_bound", "effective_step")}
           for n, t in telemetry.items()}
    ranks = {n: specs[n].rank for n in tel}
    steps = sorted(t["effective_step"] for t in tel.values())
    return {
        "frame_motion_u": math.sqrt(sum(t["frame_motion_u"] ** 2 for t in tel.values())),
        "frame_motion_v": math.sqrt(sum(t["frame_motion_v"] ** 2 for t in tel.values())),
        "s_at_bound": sum(t["at_bound"] * ranks[n] for n, t in tel.items()) / sum(ranks.values()),
        "delta_step_min": steps[0], "delta_step_median": steps[len(steps) // 2],
        "delta_step_max": steps[-1],
        "delta_step_spread": steps[-1] / steps[0] if steps[0] > 0 else math.inf,
    }
