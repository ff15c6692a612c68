"""The configs of one InduceKV task step (``edgekv adapt``): plain dataclasses, no torch.

:class:`AdaptConfig` nests :class:`EntryConfig` (how an example becomes an entry,
:mod:`edgekv.induce.entries`), :class:`SelectionConfig` (the outer level,
:mod:`edgekv.induce.select`) and :class:`CalibrationConfig` (the inner level,
:mod:`edgekv.induce.calibrate`). They live here, apart from the torch code, so that the CLI
takes its options' help and defaults from them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edgekv.configs import Config, knob
from edgekv.errors import InputError, MismatchError
from edgekv.format.layout import DEFAULT_PAYLOAD_DTYPE  # EntryConfig.payload_dtype of a new memory

if TYPE_CHECKING:
    from edgekv.format import MemorySpec

POOLINGS = ("adaptive", "answer", "answer_avg")  # EntryConfig.pooling (see edgekv.induce.entries)
PAYLOAD_DTYPES = ("int8", "int4", "fp16")  # the memory format's payload dtypes (edgekv.format.PAYLOAD_CODES)
DEFAULT_POOLED_LEN = 16  # EntryConfig.pooled_len of a new memory when none is set


def _at_least(obj: object, low: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < low:
            raise InputError(f"{type(obj).__name__}.{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class EntryConfig(Config):
    """How an example becomes an entry.

    ``pooled_len`` and ``payload_dtype`` are properties of the memory file: None (the default)
    follows an existing memory and gives a new one 16 / "int8"; a set value must match an
    existing memory (:func:`resolve_entry_config`).
    """

    pooled_len: int | None = knob(None, "KV positions per entry, m (sets the slot size); default: the "
                                        f"memory's, {DEFAULT_POOLED_LEN} for a new memory.")
    pooling: str = "answer"  # answer | answer_avg | adaptive (see edgekv.induce.entries)
    skip_template_prefix: bool = True  # drop the chat template's fixed preamble before pooling
    payload_dtype: str | None = knob(None, "Payload dtype, int8, int4 (densest) or fp16; default: the memory's, "
                                           f"{DEFAULT_PAYLOAD_DTYPE} for a new memory.")
    batch_size: int = 8  # examples per forward pass

    def __post_init__(self) -> None:
        m = self.pooled_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise InputError(f"EntryConfig.pooled_len must be an integer >= 1, got {m!r}")
        if self.pooling not in POOLINGS:
            raise InputError(f"EntryConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.payload_dtype is not None and self.payload_dtype not in PAYLOAD_DTYPES:
            raise InputError(f"EntryConfig.payload_dtype must be 'int8', 'int4' or 'fp16', got {self.payload_dtype!r}")
        _at_least(self, 1, "batch_size")


def resolve_entry_config(cfg: EntryConfig, spec: MemorySpec | None = None, where: str = "the memory"
                         ) -> EntryConfig:
    """``cfg`` with ``pooled_len`` and ``payload_dtype`` set: from the memory ``spec`` (``where``:
    its path, for errors) where they are None, else the defaults of a new memory (``spec`` None).

    A value set in ``cfg`` that differs from ``spec`` raises :class:`MismatchError` naming the field.
    """
    if spec is None:
        return replace(cfg, pooled_len=DEFAULT_POOLED_LEN if cfg.pooled_len is None else cfg.pooled_len,
                       payload_dtype=DEFAULT_PAYLOAD_DTYPE if cfg.payload_dtype is None else cfg.payload_dtype)
    if cfg.pooled_len is not None and cfg.pooled_len != spec.pooled_len:
        raise MismatchError(f"{where} holds entries of m = {spec.pooled_len} positions, EntryConfig.pooled_len "
                            f"says {cfg.pooled_len} (omit it, or start a new memory)")
    if cfg.payload_dtype is not None and cfg.payload_dtype != spec.payload_dtype:
        raise MismatchError(f"{where} stores {spec.payload_dtype} payloads, EntryConfig.payload_dtype says "
                            f"{cfg.payload_dtype} (omit it, or start a new memory)")
    return replace(cfg, pooled_len=spec.pooled_len, payload_dtype=spec.payload_dtype)


@dataclass(frozen=True)
class SelectionConfig(Config):
    """The outer level of the bilevel problem."""

    beta: float = 1.0  # weight of the anchor (earlier tasks) NLL: retention vs. the current task
    gamma: float = 0.2  # weight of the coverage term Omega_spec: diversity of kept keys
    eps: float = 0.05  # ridge in log det(C(w) + eps I): how much an uncovered direction is worth
    steps: int = knob(24, "Projected-gradient steps of the bilevel selection.")
    lr: float = 0.2  # largest change of any w_i in one step
    batch_size: int = 8  # queries per batch (current task and anchors each)
    seed: int = 0
    random: bool = False  # ablation: keep a seeded uniform random B of the candidates (no J, no steps)
    balance_tasks: bool = knob(False, "Weigh every task alike in J: beta is multiplied by the number of earlier "
                                      "tasks among the anchors, so L_anc (their mean NLL) counts as much per task as "
                                      "L_cur (edgekv.induce.adapt.task_balanced).")

    def __post_init__(self) -> None:
        _at_least(self, 0, "beta", "gamma", "steps")
        _at_least(self, 1, "batch_size")
        if self.eps <= 0:
            raise InputError(f"SelectionConfig.eps must be > 0, got {self.eps}")
        if not 0 < self.lr <= 1:
            raise InputError(f"SelectionConfig.lr must be in (0, 1], got {self.lr}")


@dataclass(frozen=True)
class CalibrationConfig(Config):
    """Adam on phi (tau, value gates) against the current task's NLL."""

    steps: int = 12  # Adam steps of the final calibration on the kept memory
    lr: float = 0.1  # Adam learning rate on phi (raw, pre-softplus/sigmoid parameters)
    batch_size: int = 8  # queries per step
    gate_clip: float = 0.02  # initial gates are clipped to [clip, 1 - clip] (sigmoid never reaches 0 or 1)
    min_tau: float = 1e-3  # tau never drops below this (softplus(phi) + min_tau)
    with_anchors: bool = True  # phi's objective adds beta * L_anc (phi is shared by every task); False: current task only
    seed: int = 0
    enabled: bool = True  # False (ablation): phi keeps its initial value; no inner-level or final steps
    fit_tau: bool = True  # False (ablation "uniform alpha"): tau stays at its initial value, the gates are still fitted

    def __post_init__(self) -> None:
        _at_least(self, 0, "steps")
        _at_least(self, 1, "batch_size")
        if not 0 < self.lr <= 10:
            raise InputError(f"CalibrationConfig.lr must be in (0, 10], got {self.lr}")
        if not 0 < self.gate_clip < 0.5:
            raise InputError(f"CalibrationConfig.gate_clip must be in (0, 0.5), got {self.gate_clip}")
        if self.min_tau <= 0:
            raise InputError(f"CalibrationConfig.min_tau must be > 0, got {self.min_tau}")


@dataclass(frozen=True)
class AdaptConfig(Config):
    """Everything one task step does; nested configs for entries, selection, calibration."""

    entry: EntryConfig = knob(default_factory=EntryConfig, help="How examples become entries.")
    selection: SelectionConfig = knob(default_factory=SelectionConfig, help="The bilevel selection.")
    calibration: CalibrationConfig = knob(default_factory=CalibrationConfig, help="The calibration of phi.")
    top_k: int = knob(4, "Entries retrieved per query (use the same k at run time).")
    key_layer: int | None = None  # hidden-state layer of the retrieval key; None: default_key_layer(L)
    key_pooling: str = "mean"  # mean | last (the probe: mean with the projection is far better)
    proj_dirs: int = 3  # top principal directions removed from keys (all-but-the-top)
    phrase_dirs: int = 0  # phrasing directions removed from keys before the principal ones (0: none)
    phrase_rank: int = 64  # rows of the host's phrasing sketch (edgekv.retrieval.update_sketch)
    proj_max_dirs: int = 8  # capacity for directions in the memory header (fixed at creation)
    init_tau: float = 0.5  # tau of a new memory before its first calibration (chosen on edge6 val: docs/induce.md)
    init_gate: float = 0.95  # value gates of a new memory before its first calibration
    max_candidates: int = 512  # task examples turned into candidate entries (seeded sample)
    max_queries: int = 512  # task examples used as L_cur queries (seeded sample)
    anchors_per_task: int = 16  # examples kept on the host per task for L_anc (never deployed), spread over its keys
    eval_queries: int = 32  # queries (current and anchors each) for the J before/after report
    seed: int = knob(0, "Seed for sampling and batches.")

    def __post_init__(self) -> None:
        _at_least(self, 1, "top_k", "max_candidates", "max_queries", "eval_queries")
        _at_least(self, 0, "anchors_per_task", "phrase_dirs")
        _at_least(self, 1, "phrase_rank")
        if self.key_layer is not None:
            _at_least(self, 0, "key_layer")
        if self.key_pooling not in ("mean", "last"):
            raise InputError(f"AdaptConfig.key_pooling must be 'mean' or 'last', got {self.key_pooling!r}")
        if not 0 <= self.proj_dirs <= self.proj_max_dirs:
            raise InputError(f"AdaptConfig.proj_dirs must be in [0, proj_max_dirs={self.proj_max_dirs}], "
                             f"got {self.proj_dirs}")
        if self.init_tau <= 0:
            raise InputError(f"AdaptConfig.init_tau must be > 0, got {self.init_tau}")
        if not 0 < self.init_gate <= 1:
            raise InputError(f"AdaptConfig.init_gate must be in (0, 1], got {self.init_gate}")
