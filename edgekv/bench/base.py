"""The interface every benchmarked method implements (:mod:`edgekv.bench.methods`,
:mod:`edgekv.bench.lora`): what it gets (:class:`Context`) and what it does (:class:`Method`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgekv.bench.config import BenchConfig
from edgekv.data import Example


@dataclass
class Context:
    """What every method gets: the frozen backbone, the knobs, its budget and a work folder."""

    backbone: object
    cfg: BenchConfig
    budget: int  # bytes
    work_dir: str  # the method's scratch folder (its live state)


class Method:
    """Base class: learn tasks in order; answer; report bytes; save/load state."""

    name = "method"
    budget_dependent = True
    supports_images = True  # False: text examples only (checked before a run starts)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        os.makedirs(ctx.work_dir, exist_ok=True)

    def params(self) -> dict:
        """Method settings that change its results (part of the stage fingerprint)."""
        return {}

    def min_budget(self) -> int:
        return 0

    def learn(self, task_index: int, task_name: str, train: Sequence[Example]) -> dict:
        raise NotImplementedError

    def answer(self, examples: Sequence[Example]) -> list[str]:
        raise NotImplementedError

    def deployed_bytes(self) -> int:
        return 0

    def host_bytes(self) -> int:
        return 0

    def info(self) -> dict:
        """Facts to report after a task (slots, rank, ...)."""
        return {}

    def first_token(self) -> Callable[[Example], None] | None:
        """A function running one text query from its text to its first token's logits
        (everything the device would do before the first token), or None."""
        return None

    def save(self, folder: str) -> None:
        pass

    def load(self, folder: str) -> None:
        pass
