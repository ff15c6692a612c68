"""Load test of ``edgekv serve`` on loopback: SmolLM2-135M (int4 weights) with a memory of the
runtime benchmark's facts, N concurrent ``openai`` clients x M chat requests each.

Checks that nothing is lost (every request answered 200, every answer identical to the same
request sent alone: greedy decoding, so concurrency must not change a byte) and reports
requests/s, tokens/s and latency percentiles (whole request; streaming: time to the first
content chunk). The server runs in a separate process (``edgekv serve``), as users run it.
Run alone: timings taken beside other work are meaningless.

    .venv/bin/python benchmarks/serve_load.py [--clients 8] [--requests 50] [--max-tokens 16]

Writes benchmarks/results/serve_load.json and serve_load.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, RESULTS, build_memory, export_cached, machine, write_json  # noqa: E402
from runtime_bench import FACTS  # noqa: E402


def start_server(art: str, mem: str, threads: int, concurrent: int) -> tuple[subprocess.Popen, str]:
    exe = os.path.join(os.path.dirname(sys.executable), "edgekv")
    proc = subprocess.Popen([exe, "serve", art, "--memory", mem, "--port", "0", "--threads", str(threads),
                             "--max-concurrent", str(concurrent)], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if " on http" not in line:
        proc.kill()
        raise SystemExit(f"edgekv serve did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split(" ")[0]


def one_request(client, question: str, max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    msgs = [{"role": "user", "content": question}]
    if stream:
        first, text, tokens = None, "", 0
        for ch in client.chat.completions.create(model="m", messages=msgs, max_tokens=max_tokens, stream=True):
            piece = ch.choices[0].delta.content if ch.choices else None
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece or ""
            if ch.usage is not None:
                tokens = ch.usage.completion_tokens
        return {"text": text, "tokens": tokens, "latency_s": time.perf_counter() - t0, "first_s": first}
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=max_tokens)
    return {"text": r.choices[0].message.content, "tokens": r.usage.completion_tokens,
            "latency_s": time.perf_counter() - t0, "first_s": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the server")
    ap.add_argument("--max-concurrent", type=int, default=2, help="generations the server runs at once")
    args = ap.parse_args()
    import openai

    art = export_cached("smollm2-135m", "perf-int4", quantize_weights="int4")
    mem = os.path.join(CACHE, "serve-facts.ekv")
    if not os.path.exists(mem):
        from edgekv.host.models import load_backbone

        build_memory(mem, load_backbone("smollm2-135m"), FACTS, 64)
    questions = [q for q, _ in FACTS]
    proc, url = start_server(art, mem, args.threads, args.max_concurrent)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        reference = {q: one_request(client, q, args.max_tokens, False)["text"] for q in questions}  # alone
        jobs = [(c, i) for c in range(args.clients) for i in range(args.requests)]

        def job(ci):
            c, i = ci
            q = questions[(c * 7 + i) % len(questions)]
            try:
                r = one_request(client, q, args.max_tokens, stream=(i % 2 == 1))
                r.update(ok=r["text"] == reference[q], error=None)
            except Exception as e:  # counted, never hidden
                r = {"ok": False, "error": f"{type(e).__name__}: {e}", "latency_s": None, "first_s": None, "tokens": 0}
            return r

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(job, jobs))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = np.array([r["latency_s"] for r in results if r["latency_s"] is not None])
    first = np.array([r["first_s"] for r in results if r["first_s"] is not None])
    errors = [r["error"] for r in results if r["error"]]

    def pct(a, p):
        return round(float(np.percentile(a, p)) * 1000, 1) if len(a) else None

    out = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "model": "smollm2-135m, int4 weights", "memory_entries": len(FACTS),
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "server_threads": args.threads, "server_max_concurrent": args.max_concurrent,
        "requests": len(results), "errors": len(errors), "first_errors": errors[:5],
        "answers_identical_to_alone": sum(r["ok"] for r in results),
        "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 3),
        "completion_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": pct(lat, 100)},
        "stream_first_content_ms": {"p50": pct(first, 50), "p95": pct(first, 95)},
    }
    print(write_json("serve_load.json", out))
    print({k: out[k] for k in ("requests", "errors", "answers_identical_to_alone", "requests_per_s", "latency_ms",
                               "stream_first_content_ms")})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(lat * 1000, bins=40, alpha=0.7, label="whole request")
        if len(first):
            ax.hist(first * 1000, bins=40, alpha=0.7, label="stream: first content")
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        ax.set_title(f"edgekv serve: {args.clients} clients x {args.requests} requests, "
                     f"{out['requests_per_s']} req/s", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "serve_load.png"))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
