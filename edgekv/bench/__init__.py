"""``edgekv bench``: the continual benchmark of InduceKV against baselines at matched byte budgets.

Modules: :mod:`metrics` (A-matrix metrics, pure numpy), :mod:`config` (the one frozen
:class:`BenchConfig` of cost knobs), :mod:`evaluate` (batched greedy answers with or without
memory, time to first token), :mod:`methods` (the registry: zero-shot, InduceKV and its
ablations, reservoir/FIFO KV memories, prompt-text retrieval), :mod:`lora` (LoRA and
replay + LoRA with ``peft``), :mod:`runner` (resumable stages), :mod:`report` (JSON,
Markdown, plots). Host side only (torch).
"""
