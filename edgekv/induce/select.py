"""Outer level: which candidates the fixed-size memory keeps.

Selection weights w over the candidates (the current memory plus the new task's entries)
live on the capped simplex ``{w : 0 <= w_i <= 1, sum w = B}`` (B = number of slots) and
minimise

    J(w) = L_cur(w) + beta * L_anc(w) + gamma * Omega_spec(w)

* L_cur / L_anc: answer NLL of current-task queries / anchor queries from earlier tasks
  with retrieval over the w-weighted memory (w enters alpha: alpha_i ∝ w_i exp(sim_i/tau),
  and the top-k ranking: sim_i/tau + log w_i), supplied by the caller as a closure;
* Omega_spec(w) = -log det(C(w) + eps I), C(w) = sum_i w_i p_i p_i^T over the candidates'
  projected (effective) retrieval keys p_i: a coverage term, lowest when the weight is
  spread over entries whose keys point in different directions, so redundant entries
  (near-duplicate keys) share the weight one of them would get. Computed and reported
  without its constant R log(eps) (0 for an empty memory).

Solved by projected gradient: each step moves w against dJ/dw, normalised by its largest
magnitude (so ``lr`` is the largest change of any w_i per step), then projects back onto
the capped simplex (bisection on the shift). The top-B entries by w are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgekv.induce.config import SelectionConfig

if TYPE_CHECKING:
    from edgekv.induce.calibrate import Phi
    from edgekv.induce.torch_induction import Induction, QuerySet


def project_capped_simplex(v: torch.Tensor, total: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection of v [N] onto {w : 0 <= w <= 1, sum w = total}.

    w = clip(v - theta, 0, 1) with theta found by bisection (sum is monotone in theta).
    """
    n = v.numel()
    if not 0 <= total <= n:
        raise RuntimeError(f"cannot keep {total} of {n} candidates")  # select() keeps all when N <= slots
    v = v.detach().double()
    lo, hi = float(v.min()) - 1.0, float(v.max())  # sum(lo) = n >= total >= 0 = sum(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((v - mid).clamp(0, 1).sum()) > total:
            lo = mid
        else:
            hi = mid
    w = (v - 0.5 * (lo + hi)).clamp(0, 1)
    return w.float()


def coverage(w: torch.Tensor, P: torch.Tensor, eps: float) -> torch.Tensor:
    """Omega_spec = -log det(C(w) + eps I_R) + R log eps = -log det(I_R + C(w) / eps).

    The paper's term minus its constant R log(eps): same gradients, and 0 for an empty
    memory, so reported values read as "coverage gained". w: [N], P: [N, R] -> scalar.
    Computed in the smaller of the two spaces (Sylvester:
    det(I_R + P^T W P / eps) = det(I_N + W^1/2 P P^T W^1/2 / eps)).
    """
    N, R = P.shape
    P = P.double()
    w = w.double().clamp(min=0)
    if N < R:
        s = w.sqrt()
        G = (s[:, None] * (P @ P.T) * s[None, :]) / eps + torch.eye(N, dtype=torch.float64)
        return -torch.logdet(G).float()
    C = (P * w[:, None]).T @ P / eps + torch.eye(R, dtype=torch.float64)
    return -torch.logdet(C).float()


def keep_top(w: torch.Tensor | np.ndarray, num: int) -> np.ndarray:
    """Indices of the ``num`` largest weights, ascending (ties: lower index first)."""
    w = np.asarray(w.detach() if torch.is_tensor(w) else w, np.float64)
    order = np.argsort(-w, kind="stable")[:num]
    return np.sort(order)


def initial_weights(num: int, num_slots: int) -> torch.Tensor:
    """Uniform w with sum = min(B, N): every candidate starts equal."""
    return torch.full((num,), min(num_slots, num) / max(num, 1))


@dataclass
class SelectionResult:
    w: torch.Tensor  # [N] final weights
    keep: np.ndarray  # indices of kept candidates (ascending)
    history: list[dict] = field(default_factory=list)  # per step: L_cur, L_anc, omega, J


LossTerms = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class SelectionLoss:
    """J's loss terms at one step of :func:`select` (a :data:`LossTerms`): L_cur and L_anc, the
    answer NLL of a batch of current-task queries / anchors of earlier tasks with retrieval
    over the w-weighted candidates (w enters alpha and the top-k ranking as log w).

    ``induction``: over every candidate (the current memory's entries, then the new ones);
    ``cur_batches[step]`` / ``anc_batches[step]``: the query rows of each step; ``phi``: the
    calibration the inner level steps between outer steps (tau and gates are read at each
    call). ``anchors_move_phi`` False: L_anc's gradient does not reach phi
    (``CalibrationConfig.with_anchors``), it still reaches w.
    """

    induction: Induction
    phi: Phi
    cur: QuerySet
    cur_batches: Sequence[Sequence[int]]
    anc: QuerySet | None = None
    anc_batches: Sequence[Sequence[int]] | None = None
    anchors_move_phi: bool = True

    def __call__(self, w: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w: [N] selection weights (differentiable) -> (L_cur, L_anc or None), scalars."""
        phi = self.phi
        log_w = torch.log(w.clamp(min=1e-6))  # [N]
        l_cur = self.induction.loss(self.cur, self.cur_batches[step], log_w, phi.tau(), phi.gates())
        if self.anc is None or self.anc_batches is None:
            return l_cur, None
        tau, gates = (phi.tau(), phi.gates()) if self.anchors_move_phi else (phi.tau().detach(), phi.gates().detach())
        return l_cur, self.induction.loss(self.anc, self.anc_batches[step], log_w, tau, gates)


def select(num_slots: int, P: torch.Tensor, loss_terms: LossTerms, cfg: SelectionConfig,
           w0: torch.Tensor | None = None, after_backward: Callable[[], None] | None = None,
           progress: bool = False) -> SelectionResult:
    """Projected gradient on J(w); keep the top ``num_slots`` candidates.

    P: [N, R] effective keys of the candidates. ``loss_terms(w, step)`` returns
    (L_cur, L_anc or None) differentiable in w. ``after_backward`` runs after each
    ``J.backward()`` (the inner level uses it to step the calibration).
    With N <= num_slots every candidate is kept and no step runs.
    """
    from tqdm.auto import tqdm

    N = len(P)
    if N <= num_slots:
        return SelectionResult(torch.ones(N), np.arange(N), [])
    if cfg.random:  # ablation: no objective, a seeded random subset
        keep = np.sort(np.random.default_rng(cfg.seed).choice(N, size=num_slots, replace=False))
        w = torch.zeros(N)
        w[torch.as_tensor(keep)] = 1.0
        return SelectionResult(w, keep, [])
    w = (w0.clone() if w0 is not None else initial_weights(N, num_slots)).float()
    w = project_capped_simplex(w, float(num_slots))
    history = []
    bar = tqdm(range(cfg.steps), desc="select", leave=False, disable=not progress)
    for step in bar:
        wv = w.clone().requires_grad_(True)
        l_cur, l_anc = loss_terms(wv, step)
        omega = coverage(wv, P, cfg.eps)
        J = l_cur + cfg.gamma * omega + (cfg.beta * l_anc if l_anc is not None else 0.0)
        J.backward()
        if after_backward is not None:
            after_backward()
        g = wv.grad.detach()
        scale = float(g.abs().max())
        if scale > 0:
            w = project_capped_simplex(w - cfg.lr * g / scale, float(num_slots))
        history.append({"L_cur": float(l_cur.detach()), "omega": float(omega.detach()), "J": float(J.detach()),
                        "L_anc": None if l_anc is None else float(l_anc.detach())})
        bar.set_postfix(J=f"{float(J.detach()):.3f}")
    return SelectionResult(w.detach(), keep_top(w, num_slots), history)
