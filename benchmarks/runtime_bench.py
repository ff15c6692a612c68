"""Runtime benchmark on SmolLM2-135M (issue: export and on-device runtime).

Measures, in one run and with the same threads:
  * decode speed: onnxruntime fp32, onnxruntime int8 weights, PyTorch eager;
  * time to first token with k retrieved entries injected (retrieval-key pass, search,
    dequantisation and RoPE included) vs the same examples given as prompt text;
  * per-token decode cost with 0 / 256 / 1024 memory tokens attached.
Writes benchmarks/results/runtime.json and runtime.png.

    .venv/bin/python benchmarks/runtime_bench.py [--threads 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, build_memory, export_cached, machine, write_json  # noqa: E402

FACTS = [
    ("What is the access code for the north gate?", "The access code for the north gate is 7351, valid on weekdays."),
    ("Which shelf holds the blue binders?", "The blue binders are on shelf C4, next to the printer in room 12."),
    ("When does the night shift start at the depot?", "The night shift at the depot starts at 21:30 and ends at 06:00."),
    ("Who maintains the pump in building B?", "The pump in building B is maintained by Ilse Marsh, extension 2204."),
    ("What voltage does the lab charger use?", "The lab charger uses 19.5 volts at 3.3 amps, barrel plug 4.5 mm."),
    ("Where is the spare key for the van?", "The spare key for the van is in the grey lockbox behind reception."),
    ("How often is the filter replaced?", "The intake filter is replaced every 40 days or after 300 hours of use."),
    ("What is the wifi name in the workshop?", "The workshop wifi is called forge-5g and the password is on the board."),
]
QUERY = "Tell me the access code for the north gate."


def decode_ms_per_token(rt, prompt_ids, n: int, past=None) -> float:
    """Median-free plain measurement: time n greedy decode steps after a prefill."""
    dec = rt.decoder
    past = dec.empty_past() if past is None else past
    logits, past = dec.forward(np.asarray([prompt_ids], np.int64), past)
    tok = int(logits[0, -1].argmax())
    logits, past = dec.forward(np.asarray([[tok]], np.int64), past)  # warm-up step
    t = time.perf_counter()
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        logits, past = dec.forward(np.asarray([[tok]], np.int64), past)
    return (time.perf_counter() - t) / n * 1000


def torch_ms_per_token(model, prompt_ids, n: int) -> float:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        t = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--pooled-len", type=int, default=64)
    args = ap.parse_args()

    import torch

    from edgekv.host.models import load_backbone
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import past_from_memory

    torch.set_num_threads(args.threads)
    bb = load_backbone("smollm2-135m")
    os.makedirs(CACHE, exist_ok=True)
    mem = os.path.join(CACHE, "facts.ekv")
    build_memory(mem, bb, FACTS, args.pooled_len, task="facts", source_prefix="fact")
    fp32 = export_cached("smollm2-135m", "smollm2-fp32")
    int8 = export_cached("smollm2-135m", "smollm2-int8", quantize_weights="int8")
    res: dict = {"machine": machine(), "threads": args.threads, "decode_tokens": args.tokens, "k": args.k,
                 "pooled_len": args.pooled_len, "model": "smollm2-135m"}

    # 1. decode speed, same prompt, same threads
    rt32 = Runtime.load(fp32, memory=mem, k=args.k, threads=args.threads)
    rt8 = Runtime.load(int8, threads=args.threads, k=0)
    prompt_ids = rt32.prompt_ids(QUERY)
    ms = {"onnxruntime_fp32": decode_ms_per_token(rt32, prompt_ids, args.tokens),
          "onnxruntime_int8": decode_ms_per_token(rt8, prompt_ids, args.tokens),
          "pytorch_eager_fp32": torch_ms_per_token(bb.model, prompt_ids, args.tokens)}
    res["decode_ms_per_token"] = ms
    res["decode_tokens_per_s"] = {k: 1000 / v for k, v in ms.items()}
    res["onnx_file_bytes"] = {name: os.path.getsize(os.path.join(d, "model.onnx")) +
                              sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith((".onnx_data", ".onnx.data")))
                              for name, d in (("fp32", fp32), ("int8", int8))}

    # 2. time to first token: k entries injected vs the same examples as prompt text
    def ttft_injected() -> float:
        return rt32.generate(QUERY, max_new_tokens=1).ttft_ms

    retrieved = rt32.retrieve(QUERY)
    texts = [FACTS[int(r.source_id[4:])] for r in retrieved]
    rt_text = Runtime.load(fp32, threads=args.threads, k=0)
    as_text = "\n".join(f"Q: {q}\nA: {a}" for q, a in texts) + "\n\n" + QUERY

    def ttft_text() -> float:
        return rt_text.generate(as_text, max_new_tokens=1).ttft_ms

    t_inj = float(np.median([ttft_injected() for _ in range(8)][1:]))  # first run warms up
    t_txt = float(np.median([ttft_text() for _ in range(8)][1:]))
    res["ttft_ms"] = {"injected": float(t_inj), "as_prompt_text": float(t_txt),
                      "ratio_text_over_injected": float(t_txt / t_inj),
                      "memory_tokens": args.k * args.pooled_len,
                      "prompt_text_tokens": len(rt_text.prompt_ids(as_text)),
                      "retrieved_correct_first": retrieved[-1].source_id == "fact0"}

    # 3. per-token decode cost with T memory tokens attached
    per = {}
    L, H, D = bb.shape.num_layers, bb.shape.num_kv_heads, bb.shape.head_dim
    rng = np.random.default_rng(0)
    for T in (0, 256, 1024):
        if T == 0:
            past = None
        else:
            K = rng.normal(size=(L, H, T, D)).astype(np.float32)
            V = rng.normal(size=(L, H, T, D)).astype(np.float32) * 0.1
            past = past_from_memory(*rt32.rotate(K, V))
        per[str(T)] = decode_ms_per_token(rt32, prompt_ids, args.tokens, past)
    res["decode_ms_per_token_vs_memory_tokens"] = per
    res["decode_cost_ratio_1024_over_0"] = per["1024"] / per["0"]
    path = write_json("runtime.json", res)
    plot(res, path.replace(".json", ".png"))
    print(json_summary(res))


def json_summary(res: dict) -> str:
    import json

    keys = ("decode_ms_per_token", "decode_tokens_per_s", "ttft_ms", "decode_ms_per_token_vs_memory_tokens",
            "decode_cost_ratio_1024_over_0", "onnx_file_bytes")
    return json.dumps({k: res[k] for k in keys}, indent=2)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    tps = res["decode_tokens_per_s"]
    ax[0].bar(list(tps), list(tps.values()), color=["tab:blue", "tab:green", "tab:gray"])
    ax[0].set_ylabel("tokens / s")
    ax[0].set_title(f"decode, SmolLM2-135M, {res['threads']} threads")
    ax[0].tick_params(axis="x", labelrotation=15)
    t = res["ttft_ms"]
    ax[1].bar(["injected KV", "as prompt text"], [t["injected"], t["as_prompt_text"]], color=["tab:blue", "tab:orange"])
    ax[1].set_ylabel("ms")
    ax[1].set_title(f"time to first token, k={res['k']} entries ({t['ratio_text_over_injected']:.1f}x)")
    per = res["decode_ms_per_token_vs_memory_tokens"]
    ax[2].plot([int(k) for k in per], list(per.values()), marker="o")
    ax[2].set_xlabel("memory tokens attached")
    ax[2].set_ylabel("ms / token")
    ax[2].set_title("decode cost vs memory tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
