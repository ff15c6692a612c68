"""LoRA baselines with ``peft``: LoRA trained task after task, and replay + LoRA.

Budget matching: the adapter's parameters x ``BenchConfig.lora_bytes_per_param`` (fp16 by
default) are the deployed bytes. The rank is the largest that keeps them within the
budget on ``BenchConfig.lora_targets`` (:func:`choose_rank`), capped at the smallest
in/out width of a targeted layer (a higher rank adds nothing). Training: AdamW on the
answer tokens' NLL (the same loss as InduceKV's L_cur, no memory), ``lora_epochs`` passes
over each task's train set, seeded; a fresh optimiser per task. Replay + LoRA mixes a
replay buffer (reservoir over earlier tasks' train examples, ``replay_size`` examples,
kept on the host and reported as host bytes) into every task's training set. ``lora_lr`` and
``lora_epochs`` can be tuned on the val split first (``BenchConfig.tune``,
:func:`edgekv.bench.grid.tune`); the test runs then use the chosen values.

Image+text examples (vision-language backbones): the adapters sit on the language model
only (its ``lora_targets`` layers; the vision encoder and projector stay frozen and carry
none, so the rank is budget-matched over the language model's layers); an example's
conversation is encoded as adapt and the runtime encode it (:func:`edgekv.induce.entries.encode_image_example`,
the image features spliced into the input embeddings) and the loss is on its answer tokens.
Answers go through :func:`edgekv.induce.evaluate.answer_examples` with the adapted model
in the backbone's place (peft injects the adapters into that model's layers in place).
A text backbone ignores the examples' images.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from edgekv.bench import evaluate
from edgekv.bench.base import Context, Method
from edgekv.data import Example
from edgekv.errors import MissingDependencyError


def target_linears(model, targets: Sequence[str]) -> list[tuple[str, int, int]]:
    """(full name, in_features, out_features) of the language model's linear layers whose
    name ends with a target (a VLM's vision tower is left out)."""
    from edgekv.induce.torch_induction import text_decoder

    dec = text_decoder(model)
    prefix = next(n for n, m in model.named_modules() if m is dec)
    out = []
    for name, mod in dec.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            out.append((f"{prefix}.{name}" if prefix else name, mod.in_features, mod.out_features))
    return out


def choose_rank(linears: Sequence[tuple[str, int, int]], budget: int, bytes_per_param: int) -> int:
    """Largest rank r with r * sum(in + out) * bytes_per_param <= budget (0 if none fits),
    at most min(in, out) over the targeted layers."""
    per_rank = sum(i + o for _, i, o in linears)
    if per_rank == 0:
        return 0
    cap = min(min(i, o) for _, i, o in linears)
    return int(min(budget // (per_rank * bytes_per_param), cap))


class Lora(Method):
    """LoRA on the language model, trained task after task (adapter bytes = the budget)."""

    name = "lora"
    replay = False

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.linears = target_linears(ctx.backbone.model, ctx.cfg.lora_targets)
        self.rank = choose_rank(self.linears, ctx.budget, ctx.cfg.lora_bytes_per_param)
        self.buffer: list[Example] = []  # replay buffer (host)
        self.seen = 0
        self._model = None  # the HF model with adapters injected (a copy of the backbone's)
        self._peft = None

    def params(self) -> dict:
        c = self.ctx.cfg
        return {"rank": self.rank, "targets": list(c.lora_targets), "epochs": c.lora_epochs, "lr": c.lora_lr,
                "batch_size": c.lora_batch_size, "replay": self.replay,
                "replay_size": c.replay_size if self.replay else 0}

    def min_budget(self) -> int:
        per_rank = sum(i + o for _, i, o in self.linears)
        return per_rank * self.ctx.cfg.lora_bytes_per_param

    def _build(self):
        if self._model is not None:
            return self._model
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MissingDependencyError("the LoRA baselines need peft: pip install 'edgekv[host]'") from None
        torch.manual_seed(self.ctx.cfg.seed)
        base = copy.deepcopy(self.ctx.backbone.model)
        conf = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0, bias="none",
                          target_modules=[n for n, _, _ in self.linears])  # full names: the language model only
        self._peft = get_peft_model(base, conf)
        self._model = self._peft.base_model.model  # the HF model, adapters injected in place
        self._model.eval()  # no dropout anywhere; gradients still flow to the adapters
        return self._model

    def num_params(self) -> int:
        return self.rank * sum(i + o for _, i, o in self.linears)

    def deployed_bytes(self) -> int:
        return self.num_params() * self.ctx.cfg.lora_bytes_per_param if self._model is not None else 0

    def host_bytes(self) -> int:
        return sum(len(json.dumps(ex.__dict__).encode("utf-8")) for ex in self.buffer)

    def info(self) -> dict:
        c = self.ctx.cfg
        return {"rank": self.rank, "targets": list(c.lora_targets), "num_params": self.num_params(),
                "replay_buffer": len(self.buffer), "lr": c.lora_lr, "epochs": c.lora_epochs}

    def adapted(self):
        """The backbone with the adapted model in its place (same tokenizer, vision inputs)."""
        return dataclasses.replace(self.ctx.backbone, model=self._build())

    def batch_loss(self, encs: Sequence, rows: Sequence[int]) -> torch.Tensor:
        """Mean answer NLL of encoded examples ``rows`` under the adapted model. -> scalar"""
        from edgekv.induce.torch_induction import answer_nll

        ids = [list(encs[r].ids[: encs[r].answer_end]) for r in rows]
        images = [encs[r].image for r in rows]
        vision = getattr(self.ctx.backbone, "vision", None)
        embeds = vision.embed_batch(ids, images)[0] if vision is not None and any(images) else None  # [B, S, H]
        return answer_nll(self._build(), ids, [encs[r].answer_start for r in rows], None, None, embeds).mean()

    def encode(self, examples: Sequence[Example]) -> list:
        """Conversation tokens (image ones through the backbone's vision inputs)."""
        from edgekv.induce.entries import encode_examples

        if getattr(self.ctx.backbone, "vision", None) is None:  # a text backbone ignores images
            examples = [dataclasses.replace(ex, image=None) for ex in examples]
        return encode_examples(self.ctx.backbone, list(examples))

    def _train(self, examples: Sequence[Example], task_index: int) -> list[float]:
        c = self.ctx.cfg
        model = self._build()
        encs = self.encode(examples)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lora_lr, weight_decay=0.0)
        rng = np.random.default_rng(c.seed * 1000 + task_index)
        losses = []
        for _ in range(c.lora_epochs):
            order = rng.permutation(len(encs))
            for i in range(0, len(order), c.lora_batch_size):
                rows = order[i: i + c.lora_batch_size]
                opt.zero_grad()
                loss = self.batch_loss(encs, rows)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return losses

    def learn(self, task_index, task_name, train) -> dict:
        data = list(train) + (list(self.buffer) if self.replay else [])
        losses = self._train(data, task_index)
        if self.replay:  # reservoir over every earlier train example
            rng = np.random.default_rng(self.ctx.cfg.seed * 1000 + task_index + 500)
            cap = self.ctx.cfg.replay_size
            for ex in train:
                self.seen += 1
                if len(self.buffer) < cap:
                    self.buffer.append(ex)
                elif cap > 0:
                    j = int(rng.integers(0, self.seen))
                    if j < cap:
                        self.buffer[j] = ex
        return {"train_examples": len(data), "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None}

    def answer(self, examples):
        c = self.ctx.cfg
        return evaluate.answer(self.adapted(), examples, None, c.top_k, c.max_new_tokens, c.eval_batch_size)

    def save(self, folder: str) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        self._build()
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self._peft).items()}
        save_file(state, os.path.join(folder, "adapter.safetensors"))
        with open(os.path.join(folder, "replay.json"), "w", encoding="utf-8") as f:
            json.dump({"seen": self.seen, "buffer": [ex.__dict__ for ex in self.buffer]}, f)

    def load(self, folder: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        self._build()
        set_peft_model_state_dict(self._peft, load_file(os.path.join(folder, "adapter.safetensors")))
        with open(os.path.join(folder, "replay.json"), encoding="utf-8") as f:
            d = json.load(f)
        self.seen, self.buffer = d["seen"], [Example(**e) for e in d["buffer"]]


class ReplayLora(Lora):
    """Replay + LoRA: a bounded replay buffer on the host mixed into each task (deployed = the adapter)."""

    name = "replay-lora"
    replay = True
