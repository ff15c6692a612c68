"""Ray for the host jobs that outgrow one machine (the ``[scale]`` extra; never on a device).

* :func:`start_ray`: connect to a cluster or start Ray here, quietly;
* :class:`RayEncoder`: ``edgekv adapt --ray``: the candidates' entries and keys (a forward
  pass of the backbone per example) computed by Ray actors that each load the frozen backbone
  once; selection, calibration and the commit stay on the driver. Shards are whole batches of
  ``EntryConfig.batch_size`` in order, so every forward pass sees the batch a local run
  builds and the memory file is byte-identical to a local run's with the same seed
  (tests/test_ray.py).
* ``edgekv bench --ray``: :mod:`edgekv.bench.distributed`.

Ray is imported only here, and only when one of these runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgekv.configs import Config, knob
from edgekv.errors import EdgeKVError, InputError, MissingDependencyError


@dataclass(frozen=True)
class RayConfig(Config):
    """How a command uses the Ray cluster."""

    address: str | None = knob(None, "Ray cluster address (host:6379 or ray://host:10001); None: start Ray "
                                     "on this machine.")
    cpus_per_cell: int = knob(1, "CPUs (and PyTorch threads) each Ray task or actor asks for.")
    workers: int = knob(2, "Ray actors that encode candidates (adapt --ray).")
    max_retries: int = 2  # retries of a task whose worker died (bench), restarts of an actor (adapt)
    num_cpus: int | None = None  # CPUs of a Ray started here (None: Ray counts them); tests bound it

    def __post_init__(self) -> None:
        for name in ("cpus_per_cell", "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"RayConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise InputError(f"RayConfig.max_retries must be >= 0, got {self.max_retries}")


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--ray needs Ray: pip install 'edgekv[scale]'") from None
    return ray


def start_ray(rcfg: RayConfig):
    """Connect to ``rcfg.address`` or start Ray on this machine (no dashboard). -> the ray module"""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=rcfg.address, num_cpus=None if rcfg.address else rcfg.num_cpus,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"cannot reach the Ray cluster at {rcfg.address}: {str(e).splitlines()[0][:200]}; "
                             f"start it (ray start --head) or leave the address out to run Ray here") from None
    return ray


def shards(n: int, batch: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges over n items: whole batches of ``batch`` in order, split as evenly as
    possible over at most ``parts`` shards (no empty shard)."""
    batches = -(-n // batch)
    parts = max(1, min(parts, batches))
    per, extra = divmod(batches, parts)
    out, b = [], 0
    for p in range(parts):
        nb = per + (p < extra)
        out.append((b * batch, min(n, (b + nb) * batch)))
        b += nb
    return [(s, e) for s, e in out if e > s]


class _EncoderActor:
    """A Ray actor holding one frozen backbone."""

    def __init__(self, model: str, threads: int):
        import torch

        from edgekv.host.models import load_backbone

        torch.set_num_threads(threads)
        self.backbone = load_backbone(model)

    def encode(self, examples, entry_cfg, key_layer: int, key_pooling: str, task: str):
        from edgekv.host.keymodel import KeyModel
        from edgekv.induce.entries import compute_entries

        km = KeyModel(self.backbone.decoder, key_layer, key_pooling)
        return compute_entries(self.backbone, examples, km, entry_cfg, task)[0]


class RayEncoder:
    """``adapt(..., encoder=RayEncoder(model, cfg))``: candidates encoded by ``cfg.workers`` actors."""

    def __init__(self, model: str, rcfg: RayConfig | None = None):
        self.rcfg = rcfg or RayConfig()
        self.ray = start_ray(self.rcfg)
        actor = self.ray.remote(num_cpus=self.rcfg.cpus_per_cell, max_restarts=self.rcfg.max_retries,
                                max_task_retries=self.rcfg.max_retries)(_EncoderActor)
        self.actors = [actor.remote(model, self.rcfg.cpus_per_cell) for _ in range(self.rcfg.workers)]

    def __call__(self, examples: Sequence, entry_cfg, key_layer: int, key_pooling: str, task: str) -> list:
        parts = shards(len(examples), entry_cfg.batch_size, len(self.actors))
        refs = [a.encode.remote(list(examples[s:e]), entry_cfg, key_layer, key_pooling, task)
                for a, (s, e) in zip(self.actors, parts, strict=False)]
        try:
            chunks = self.ray.get(refs)
        except Exception as e:  # an actor failed more often than it may restart
            cause = getattr(e, "cause", None) or e
            raise EdgeKVError(f"encoding candidates on Ray failed: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[-1][:300]}") from None
        return [entry for chunk in chunks for entry in chunk]
