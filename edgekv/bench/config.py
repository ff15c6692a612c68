"""The benchmark's cost knobs: one frozen dataclass, with a ``quick`` preset for tests and CI."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgekv.configs import Config, knob
from edgekv.errors import InputError

TUNABLE = ("lora", "replay-lora")  # methods BenchConfig.tune can tune (learning rate x epochs on val)
# fields that organise runs but change no stage's result: left out of the stage fingerprint
RUN_FIELDS = ("sweep_fractions", "sweep_methods", "ttft_queries", "tune", "tune_lora_lrs", "tune_lora_epochs",
              "ladder", "device_ttft")


@dataclass(frozen=True)
class BenchConfig(Config):
    """Everything that sets what the benchmark computes and how much it costs.

    Defaults are sized so that the default stream (~6 tasks, ~24 test examples each), all
    methods at one budget plus the budget sweep, fits well under an hour on 2 CPU cores
    (see docs/bench.md for the measured cost).
    """

    seed: int = knob(0, "Seed of the stream and of every method.")
    max_train_per_task: int = 32  # train examples used per task (seeded sample): candidates, LoRA data
    max_test_per_task: int = 0  # evaluated examples per task; 0: the whole (balanced) split; > 0: a subset
    # balanced over the task's concepts (round robin over normalised answers, in split order)
    eval_split: str = knob("test", "Split the accuracy matrix is computed on: test (reported numbers) or val "
                                   "(every tuning choice: tune on val, report test once).")
    full_matrix: bool = False  # evaluate every task after every step (upper triangle too); False: j <= i only
    top_k: int = 4  # entries / examples retrieved per query (InduceKV, reservoir, FIFO, prompt-text)
    max_new_tokens: int = 0  # greedy answer length; 0: the longest test answer in tokens + 2 (EOS, slack)
    eval_batch_size: int = 16  # queries per batched greedy decode
    # InduceKV (edgekv.induce.adapt.AdaptConfig) knobs
    pooled_len: int = 16  # m of induce / reservoir / fifo / induce-fp16 etc.
    short_pooled_len: int = 8  # m of induce-m<short>
    long_pooled_len: int = 32  # m of induce-m<long>
    selection_steps: int = 6  # projected-gradient steps of the bilevel selection
    calibration_steps: int = 4  # Adam steps of the final calibration
    induce_batch_size: int = 4  # queries per selection / calibration step (current task and anchors each)
    max_queries: int = 24  # current-task queries in L_cur
    anchors_per_task: int = 8  # host-side anchors per task (L_anc)
    eval_queries: int = 4  # queries of adapt's J before/after report (cost only; not a benchmark number)
    # LoRA (peft) knobs
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # linear layers that get adapters
    lora_epochs: int = 2  # passes over each task's train set
    lora_lr: float = 1e-3  # AdamW learning rate
    lora_batch_size: int = 8  # examples per step
    lora_bytes_per_param: int = 2  # deployed adapter dtype (fp16)
    replay_size: int = 32  # replay buffer (host) capacity in examples, reservoir over earlier tasks
    # budgets and timing
    sweep_fractions: tuple[float, ...] = (0.25, 0.5)  # without --budgets: these fractions of --budget are added
    sweep_methods: tuple[str, ...] = ("induce", "reservoir", "fifo", "lora", "replay-lora")  # methods run at
    # every budget (every fixed-footprint method); in a grid of runs only on its first run (stream, seed)
    ttft_queries: int = 6  # queries timed for time to first token (prompt-text vs injected KV)
    # tuning on val (edgekv.bench.grid.tune): a grid per tuned method on the first run, the best by val Last
    tune: tuple[str, ...] = knob((), "Methods tuned on the val split first (comma-separated: lora,replay-lora): "
                                 "the lr x epochs grid on the first run into OUT/tuning/; the test runs use the "
                                 "best by val Last.")
    tune_lora_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # LoRA learning rates of the tuning grid
    tune_lora_epochs: tuple[int, ...] = (2, 6)  # LoRA epochs of the tuning grid
    # after the runs, on the first run (edgekv.bench.grid.run_extras)
    ladder: bool = knob(False, "After the runs, the accuracy ladder on the first run's stream (memory rung: "
                               "induce's final state at the main budget) into OUT/ladder/.")
    device_ttft: bool = knob(True, "Time to first token of every method on the onnxruntime device runtime "
                                   "(an export in OUT/artifacts), first run; off in the quick preset.")

    def __post_init__(self) -> None:
        positive = ("max_train_per_task", "top_k", "eval_batch_size",
                    "pooled_len", "short_pooled_len", "long_pooled_len", "max_queries", "eval_queries", "induce_batch_size",
                    "lora_epochs", "lora_batch_size", "lora_bytes_per_param", "ttft_queries")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_test_per_task", "max_new_tokens", "selection_steps", "calibration_steps", "anchors_per_task", "replay_size"):
            if getattr(self, name) < 0:
                raise InputError(f"BenchConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_split not in ("val", "test"):
            raise InputError(f"BenchConfig.eval_split must be 'val' or 'test', got {self.eval_split!r}")
        if not 0 < self.lora_lr < 1:
            raise InputError(f"BenchConfig.lora_lr must be in (0, 1), got {self.lora_lr}")
        if not self.lora_targets:
            raise InputError("BenchConfig.lora_targets must name at least one linear layer")
        if any(not 0 < f < 1 for f in self.sweep_fractions):
            raise InputError("BenchConfig.sweep_fractions must lie in (0, 1)")
        bad = [m for m in self.tune if m not in TUNABLE]
        if bad:
            raise InputError(f"BenchConfig.tune: cannot tune {', '.join(bad)}: choose from {', '.join(TUNABLE)}")
        if not self.tune_lora_lrs or any(not 0 < x < 1 for x in self.tune_lora_lrs):
            raise InputError(f"BenchConfig.tune_lora_lrs must be learning rates in (0, 1), got {self.tune_lora_lrs}")
        if not self.tune_lora_epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 1
                                            for e in self.tune_lora_epochs):
            raise InputError(f"BenchConfig.tune_lora_epochs must be integers >= 1, got {self.tune_lora_epochs}")

    def quick(self) -> BenchConfig:
        """A preset for tests and CI: a few examples, a couple of steps, short answers."""
        return replace(self, max_train_per_task=12, max_test_per_task=6, eval_batch_size=8,
                       pooled_len=4, short_pooled_len=2, long_pooled_len=8, selection_steps=2,
                       calibration_steps=2, induce_batch_size=2, max_queries=8, anchors_per_task=2, eval_queries=4, lora_epochs=1,
                       lora_batch_size=4, replay_size=4, ttft_queries=2, tune_lora_lrs=(1e-3, 3e-3),
                       tune_lora_epochs=(1,), device_ttft=False)
