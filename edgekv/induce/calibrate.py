"""Inner level: fit the calibration phi = (phi_tau, phi_1..phi_L), the backbone frozen.

tau = softplus(phi_tau) is the retrieval temperature, lambda_l = sigmoid(phi_l) the value
gate of layer l. phi is fitted by a few Adam steps on the current task's answer NLL with
memory attached (mini-batches of the task's examples, each retrieving from the memory
without its own entry). These L+1 scalars are the only trained state of InduceKV; they
are stored in the memory header as (tau, gates).

**[edgekv]** phi serves every task in the memory, so by default its objective also
holds the anchors of earlier tasks (``L_cur + beta * L_anc``, ``with_anchors``); fitted on
the current task alone it drifts towards it (on the SmolLM2 code/number stream, task 1
kept 52% of its held-out queries instead of 67% after task 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgekv.errors import InputError
from edgekv.format import Calibration
from edgekv.induce.config import CalibrationConfig

if TYPE_CHECKING:
    from edgekv.induce.torch_induction import Induction, QuerySet


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return float(y + math.log(-math.expm1(-y)))


def logit(p: float) -> float:
    return float(math.log(p) - math.log1p(-p))


class Phi(torch.nn.Module):
    """phi_tau (scalar) and phi_l (one per layer); tau and lambda derived from them."""

    def __init__(self, tau: float, gates: Sequence[float], gate_clip: float = 0.02, min_tau: float = 1e-3,
                 fit_tau: bool = True):
        super().__init__()
        self.min_tau = min_tau
        g = np.clip(np.asarray(gates, np.float64), gate_clip, 1 - gate_clip)
        # fit_tau False: phi_tau is frozen (no gradient, so no optimiser moves it), tau stays as given
        self.phi_tau = torch.nn.Parameter(torch.tensor(inverse_softplus(max(tau - min_tau, 1e-6))),
                                          requires_grad=fit_tau)
        self.phi_gates = torch.nn.Parameter(torch.tensor([logit(x) for x in g], dtype=torch.float32))

    @staticmethod
    def from_calibration(cal: Calibration, cfg: CalibrationConfig | None = None) -> Phi:
        cfg = cfg or CalibrationConfig()
        return Phi(cal.tau, cal.gates, cfg.gate_clip, cfg.min_tau, cfg.fit_tau)

    def tau(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.phi_tau) + self.min_tau

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.phi_gates)

    def calibration(self) -> Calibration:
        return Calibration(float(self.tau().detach()), tuple(float(g) for g in self.gates().detach()))


def batches(num: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` mini-batches of row indices, cycling through seeded permutations."""
    rng = np.random.default_rng(seed)
    out, perm = [], []
    for _ in range(steps):
        if len(perm) < min(batch_size, num):
            perm = perm + rng.permutation(num).tolist()
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


def calibrate(phi: Phi, loss_fn: Callable[[Phi, list[int]], torch.Tensor], num_queries: int,
              cfg: CalibrationConfig, progress: bool = False, desc: str = "calibrate") -> list[float]:
    """Adam steps on ``loss_fn(phi, rows)`` over mini-batches of ``num_queries`` rows.

    Updates ``phi`` in place; returns the loss of each step (before its update). A step whose
    loss or gradient is not finite raises :class:`InputError` before phi is updated with it,
    so a non-finite calibration never reaches the memory.
    """
    from tqdm.auto import tqdm

    if num_queries == 0 or cfg.steps == 0 or not cfg.enabled:
        return []
    opt = torch.optim.Adam([p for p in phi.parameters() if p.requires_grad], lr=cfg.lr)  # a frozen tau stays
    losses = []
    for step, rows in enumerate(tqdm(batches(num_queries, cfg.batch_size, cfg.steps, cfg.seed), desc=desc,
                                     leave=False, disable=not progress)):
        opt.zero_grad()
        loss = loss_fn(phi, rows)
        loss.backward()
        check_finite_step(phi, loss, f"{desc} step {step + 1} of {cfg.steps}")
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def check_finite_step(phi: Phi, loss: torch.Tensor, where: str) -> None:
    """Raise :class:`InputError` naming what is not finite: the loss, phi, or phi's gradient."""
    cal = phi.calibration()
    state = f"at tau {cal.tau:.4g}"
    if not (math.isfinite(cal.tau) and all(math.isfinite(g) for g in cal.gates)):
        bad = "tau" if not math.isfinite(cal.tau) else "the layer gates"
        raise InputError(f"{where}: {bad} of the calibration is not finite ({state}, gates {list(cal.gates)}); "
                         f"nothing is committed")
    if not torch.isfinite(loss.detach()).all():
        raise InputError(f"{where}: the answer NLL with memory attached is {float(loss.detach())} {state} "
                         f"(degenerate task data or backbone output); nothing is committed")
    for name, p in (("tau", phi.phi_tau), ("the layer gates", phi.phi_gates)):
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise InputError(f"{where}: the gradient of {name} is not finite {state} (loss {float(loss.detach()):.4g}); "
                             f"nothing is committed")


def calibration_loss(phi: Phi, induction: Induction, cur: QuerySet, cur_rows: Sequence[int],
                     anc: QuerySet | None = None, anc_rows: Sequence[int] = (), beta: float = 1.0) -> torch.Tensor:
    """The final calibration's objective on exactly the kept memory (``induction`` over it, every
    w = 1): L_cur(phi) on the queries ``cur_rows`` of ``cur``, plus beta * L_anc(phi) on the
    anchors ``anc_rows`` of ``anc`` when ``anc`` is given. -> scalar."""
    zeros = torch.zeros(len(induction.bank))  # [N] log w = 0: every kept entry at full weight
    loss = induction.loss(cur, cur_rows, zeros, phi.tau(), phi.gates())
    if anc is not None:
        loss = loss + beta * induction.loss(anc, anc_rows, zeros, phi.tau(), phi.gates())
    return loss


def kept_memory_objective(induction: Induction, cur: QuerySet, anc: QuerySet | None, cfg: CalibrationConfig,
                          beta: float) -> Callable[[Phi, list[int]], torch.Tensor]:
    """:func:`calibrate`'s ``loss_fn`` for the final calibration: :func:`calibration_loss`, its
    i-th call with the i-th of ``batches(len(anc), cfg.batch_size, cfg.steps, cfg.seed + 1)``
    (the anchors only with ``cfg.with_anchors``)."""
    if anc is None or not cfg.with_anchors:
        return lambda phi, rows: calibration_loss(phi, induction, cur, rows)
    anc_batches = iter(batches(len(anc), cfg.batch_size, cfg.steps, cfg.seed + 1))
    return lambda phi, rows: calibration_loss(phi, induction, cur, rows, anc, next(anc_batches), beta)
