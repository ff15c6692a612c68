"""Tiny random models of real Hugging Face classes, with tokenizers trained in-process.

No hub access: configs are written here, weights are random (seeded), and a small BPE
tokenizer is trained on a built-in corpus. Each builder saves a normal model folder
(``config.json``, safetensors, ``tokenizer.json``, chat template) that edgekv loads like
any user's model.
"""

from __future__ import annotations

import os

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle sits left of a blue square",
    "what colour is the triangle? the triangle is green",
    "code for apple is K7, code for river is Q2, code for stone is Z9",
    "edge devices keep a fixed size memory of key value entries",
    "Question: how many dots are there? Answer: three dots",
    "hello world, this is a tiny tokenizer for tests 0123456789",
] * 20

FAMILIES = ("llama", "qwen2", "gemma", "mistral", "qwen3", "phi3", "gemma2")
# Families edgekv exports through optimum's graph (not fused), tested by tests/test_fallback.py
FALLBACK_FAMILIES = ("granite",)


def train_tokenizer(vocab_size: int = 320, added_special: tuple[str, ...] = (), chat_template: str = CHATML):
    """A byte-level BPE tokenizer trained on CORPUS; ``added_special`` tokens are added after
    training (the trained ids do not move), ``chat_template`` is saved with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    if added_special:
        fast.add_special_tokens({"additional_special_tokens": list(added_special)})
    fast.chat_template = chat_template
    return fast


def tiny_config(family: str, vocab_size: int):
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False)
    if family == "gemma":
        return GemmaConfig(**common, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh")
    if family == "mistral":  # llama's layers; a sliding window longer than the tiny context
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=256)
    if family == "qwen3":  # per-head RMSNorm of q and k before RoPE, head_dim not hidden / heads
        return Qwen3Config(**{**common, "head_dim": 24}, rope_theta=10000.0, use_sliding_window=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini's 0.75)
        return Phi3Config(**common, rope_theta=10000.0, partial_rotary_factor=0.75, sliding_window=None)
    if family == "gemma2":  # sandwich norms, soft-capping that bites at this scale (tiny logits), a query
        # scalar other than head_dim, a window on alternate layers (longer than the tests' texts here;
        # tests/test_export.py shortens it to exercise it)
        return Gemma2Config(**common, rope_theta=10000.0, query_pre_attn_scalar=8, attn_logit_softcapping=0.1,
                            final_logit_softcapping=0.5, sliding_window=256)
    if family == "granite":  # not fused: llama's layer with embedding / attention / residual / logit multipliers
        return GraniteConfig(**common, rope_theta=10000.0, embedding_multiplier=2.0, attention_multiplier=0.2,
                             residual_multiplier=0.5, logits_scaling=0.5)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + FALLBACK_FAMILIES}")


def make_tiny_model(family: str, out_dir: str, seed: int = 0) -> str:
    """Save a tiny random ``family`` causal LM with a trained tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tok = train_tokenizer()
    cfg = tiny_config(family, len(tok))
    torch.manual_seed(seed)
    return save_random_model(AutoModelForCausalLM.from_config(cfg), tok, out_dir)


def save_random_model(model, tok, out_dir: str) -> str:
    """Perturb ``model``'s norms (random init leaves them all-ones/zeros, which hides bugs in
    norm handling; torch's global seed decides), then save it and ``tok`` to ``out_dir``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
