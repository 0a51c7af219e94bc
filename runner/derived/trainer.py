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

import torch

import geometry
from runner.derived.spec import check_setup
from runner.training import StepLog


class DerivedTrainer:
    def __init__(self, ops, rule, derived, batch_size: int, micro_batch: int, *,
                 ceiling: float, floor: float):
        self.ops, self.rule, self.derived = ops, rule, derived
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.ceiling, self.floor = ceiling, floor
        self.sigma_k_min = float(derived.sigma_k_min)
        self.steps = 0  # the backends' dropout keys are drawn from (seed, step)
        # The last update, kept when the certificate's curvature criterion reads it.
        self.keep_direction = False
        self.last_direction = None

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

        # 2. MASS step size (row 1): which of the three terms binds is logged.
        inputs = (loss_f, norm_f) if self.ops.mass_on_host else (loss, grad_norm)
        mass = geometry.mass_step_size(*inputs, self.sigma_k_min, self.ceiling, self.floor)
        eta = float(mass.step)

        # 3-4. Retract U, V on their Stiefel manifolds; step S by the reading.
        direction, orth, s_ratio = self.ops.update(grads, eta, self.rule,
                                                   keep_direction=self.keep_direction)
        if direction is not None:
            self.last_direction = direction
        return StepLog(loss=loss_f, extra={
            "grad_norm": norm_f, "step_size": eta, "bound": mass.bound,
            "update_norm": eta * norm_f, "weyl_bound": self.sigma_k_min,
            "orth_error": float(orth), "adapter_norm_ratio": float(s_ratio),
        })

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
        return {"batch_size": self.batch_size, "micro_batch": self.micro_batch,
                "ceiling": self.ceiling, "floor": self.floor, "sigma_k_min": self.sigma_k_min}

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
        """name -> (lora_A (r x in), lora_B (out x r)) with B = c U diag(S), A = V^T."""
        out = {}
        for name, (u, s, v) in self.ops.host_usv().items():
            scale = self.ops.adapters.specs[name].scale
            out[name] = (v.T.contiguous(), (scale * u * s).contiguous())
        return out

    def adapter_effective_ranks(self) -> dict[str, float]:
        return {name: geometry.effective_rank(s.double()) if float(s.max()) > 0 else 0.0
                for name, (_, s, _) in self.ops.host_usv().items()}
