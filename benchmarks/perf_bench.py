"""Performance benchmark on SmolLM2-135M (issue 7): decode near the memory-bandwidth floor,
weight-only quantisation that keeps accuracy, memory tokens that cost little, resident
memory independent of the memory file's size.

Measured in one run with the same threads. Decode timings of all configurations are
*interleaved* (a few tokens of each in turn, many rounds, in a shuffled order; medians over
3 repeats), so a machine shared with other work slows every configuration alike and the
ratios hold:
  * read bandwidth of this machine (numpy and onnxruntime GEMV over 1 GiB; the fastest) and
    the bytes each decoder reads per token (weights from its graph + the KV cache):
    floor = bytes / bandwidth;
  * decode ms/token: edgekv fp32 / int8 / int4 (fused graph, shared KV buffer), the same fp32
    graph with a numpy round trip per step, optimum's fp32 graph (numpy loop as in issue 3,
    and with I/O binding), PyTorch eager; with 0 and 1,024 memory tokens attached;
  * onnxruntime's 4-bit kernel ceiling: integer zero points and int8 activations for every
    linear (no offset ops, no fp32-activation kernels), the fastest 4-bit graph its CPU
    kernels run, whatever its accuracy (not a shipped format);
  * teacher-forced top-1 agreement with PyTorch fp32 on a fixed prompt set;
  * time to first token: k=4 retrieved entries of 256 tokens (1,024 memory tokens,
    retrieval-key pass included) vs the same documents as prompt text (with the chat
    template, whose default system prompt makes the query 44 tokens, and without it);
  * peak RSS (VmHWM) of a fresh process that loads the runtime with a memory and generates,
    per weight format, and with a 10 MB vs a 1 GB memory file (same entries, same k);
  * llama.cpp as a peer (benchmarks/llama_cpp_peer.py, when llama-cpp-python is installed:
    ``make bench-deps``): the same GGUF as shipped (Q4_1) and requantised to Q8_0, the same
    threads; its decode steps interleaved with edgekv's, its top-1 over the same tokens, its
    time to first token on the prompt-text prompt, its peak RSS; edgekv / llama.cpp ratios per
    repeat (their range is reported: the gap moves with the host's state).
Writes benchmarks/results/perf.json, perf.md and perf.png.

    .venv/bin/python benchmarks/perf_bench.py [--threads 2] [--tokens 8] [--rounds 12] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp_peer  # noqa: E402
from common import CACHE, build_memory, cached_build, child_rss, export_cached, machine, write_json  # noqa: E402
from runtime_bench import FACTS  # noqa: E402

QUERY = "Tell me the access code for the north gate."
DOC_QUERY = "What is the storage code of the copper valve at site Alder?"
# Teacher-forced agreement: prose, code, dialogue-ish and list-like text (fixed, ~900 tokens).
TEXTS = [
    "The secret code for the red door is 4417, and the blue door opens with 2231. Question: what is the code for "
    "the red door? Answer: the red door opens with 4417.",
    "Photosynthesis is the process by which green plants use sunlight to synthesize foods from carbon dioxide and "
    "water. It generally involves the green pigment chlorophyll and generates oxygen as a byproduct.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "The night shift at the depot starts at 21:30 and ends at 06:00. Workers must sign in at the gate and collect "
    "their badges from the security office before the shift begins.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woman who knew the names "
    "of every bird and every tree, and children came from far away to listen to her stories.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. If the light stays "
    "red, hold the reset button for ten seconds and call the helpdesk.",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. The capital "
    "of Spain is Madrid. The capital of Portugal is Lisbon.",
    "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while Michael Collins "
    "orbited above in the command module Columbia.",
    "Ingredients: two cups of flour, one teaspoon of salt, three eggs and a cup of milk. Whisk the eggs and milk, "
    "fold in the flour and salt, and rest the batter for an hour.",
    "User: Can you help me write an email to my landlord about the broken heater?\nAssistant: Of course. Dear Mr. "
    "Hughes, I am writing to let you know that the heater in my flat stopped working on Monday.",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the boiling point drops because the "
    "air pressure is lower, which is why cooking pasta in the mountains takes longer.",
    "SELECT name, email FROM customers WHERE country = 'NO' AND created_at > '2024-01-01' ORDER BY name;",
    "The mitochondria is often called the powerhouse of the cell, because it produces most of the chemical energy "
    "needed to power the cell's biochemical reactions.",
    "Step 1: open the settings menu. Step 2: choose network. Step 3: select the wifi called forge-5g and enter "
    "the password written on the board in the workshop.",
    "A train leaves the station at 9:15 and travels at 80 kilometres per hour. Another train leaves at 10:00 at "
    "120 kilometres per hour. The second train catches up at 11:30.",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear, and his plays are still performed around the world "
    "more than four hundred years after his death.",
]
SITES = ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Gum", "Hazel"]
ITEMS = ["copper valve", "spare pump", "blue binder", "lab charger", "van key", "intake filter", "fuse box",
         "ladder", "radio", "torch", "first-aid kit", "water meter"]
WEIGHTS = ("fp32", "int8", "int4")
# issue 17's goals: edgekv / llama.cpp on the same GGUF (ms/token at top-1 >= llama.cpp's, peak RSS),
# decode with 1,024 memory tokens / none, TTFT as prompt text / injected (chat template)
TARGETS = {"fp32_over_floor": 1.15, "over_llama_cpp": 1.00, "rss_over_llama_cpp": 1.10, "ttft_ratio": 25.0,
           "memory_cost_ratio": 1.10, "rss_file_size": 0.05}
LLAMA_PEERS = {"int4": "q4_1", "int8": "q8_0"}  # edgekv weights -> the llama.cpp file type it is compared with


# --- artifacts and memories -----------------------------------------------------------
def exports() -> dict[str, str]:
    """edgekv fp32 / int8 / int4 (fused graph) and optimum's fp32 graph, exported once into the cache."""
    out = {w: export_cached("smollm2-135m", f"perf-{w}", **({"quantize_weights": w} if w != "fp32" else {}))
           for w in WEIGHTS}
    out["optimum-fp32"] = export_cached("smollm2-135m", "perf-optimum-fp32", graph="optimum")
    return out


CEILING = "int4_kernel_ceiling"
# 4-bit levers measured beside the shipped int4 (not shipped formats):
# the kernel ceiling: integer zero points, int8 activations everywhere (onnxruntime's fastest 4-bit
# kernels; poor accuracy); int8 activations everywhere with the exact Q4_1 float offsets (llama.cpp's
# Q4_1 dot products also quantise every activation to 8 bits).
VARIANTS = {CEILING: {"fp32_inputs": frozenset(), "float_offsets": False},
            "int4_int8_act": {"fp32_inputs": frozenset()}}  # = WEIGHT_FORMATS["int4-a8"] (--quantize-weights int4-a8)


def variant_export(bb, name: str) -> str:
    """A 4-bit decoder of ``bb`` in format ``VARIANTS[name]`` (cached like :func:`exports`)."""
    from edgekv.export.decoder_graph import WeightFormat
    from edgekv.export.onnx_export import export_fused

    fmt = WeightFormat(4, **VARIANTS[name])
    return cached_build(f"perf-{name.replace('_', '-')}", "smollm2-135m", {"format": name},
                        lambda out: export_fused(bb.model, bb.rope, 2, "mean", out, fmt, tokenizer=bb.tokenizer),
                        "model.onnx")


def long_doc(i: int) -> tuple[str, str]:
    """(question, ~250-token document) about site i: item locations and codes."""
    rng = np.random.default_rng(i)
    lines = [f"Inventory log for site {SITES[i]}."]
    for j, item in enumerate(ITEMS):
        lines.append(f"The {item} at site {SITES[i]} is stored in room {rng.integers(1, 40)}, shelf "
                     f"{'ABCDEFGH'[j % 8]}{rng.integers(1, 9)}, and its storage code is {rng.integers(1000, 9999)}.")
    return f"What is the storage code of the copper valve at site {SITES[i]}?", " ".join(lines)


# --- bandwidth and bytes per token ----------------------------------------------------
def read_bandwidth(threads: int, reps: int = 7) -> dict:
    """GB/s reading 1 GiB: numpy reductions in ``threads`` threads and onnxruntime's fp32 GEMV.
    The fastest is the machine's read bandwidth (the strictest floor)."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort
    from onnx import helper

    a = np.ones(256 << 20, np.float32)
    parts = np.array_split(a, threads)
    out = {}
    with ThreadPoolExecutor(threads) as ex:
        for name, fn in (("numpy_sum", np.sum), ("numpy_dot", lambda p: float(np.dot(p, p)))):
            best = 0.0
            for _ in range(reps):
                t = time.perf_counter()
                list(ex.map(fn, parts))
                best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
            out[name] = best
    k, n = 4096, a.size // 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", 1, [1, k]), helper.make_tensor_value_info("W", 1, [k, n])],
                              [helper.make_tensor_value_info("y", 1, [1, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_ortvalue_input("W", ort.OrtValue.ortvalue_from_numpy(a.reshape(k, n)))
    io.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(np.ones((1, k), np.float32)))
    io.bind_output("y", "cpu")
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    out["onnxruntime_gemv"] = best
    out["best_gb_s"] = max(out.values())
    return out


ROW_READERS = {"Gather", "GatherBlockQuantized", "RotaryEmbedding", "GroupQueryAttention"}  # cos/sin: one row


def weight_bytes_per_token(artifacts: str) -> int:
    """Bytes of initializers one decode step reads: all of them, except tables read by row
    (the embedding under Gather / GatherBlockQuantized, RoPE caches): one row each."""
    import onnx

    proto = onnx.load(os.path.join(artifacts, "model.onnx"), load_external_data=False)
    users: dict[str, set] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for t in proto.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size = int(ext["length"]) if "length" in ext else len(t.raw_data) or int(np.prod(t.dims)) * 4
        if users.get(t.name, set()) <= ROW_READERS and len(t.dims) == 2:
            size = size // max(int(t.dims[0]), 1)  # one row
        total += size
    return total


def kv_bytes(shape, positions: int) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4 * positions


# --- interleaved decode ---------------------------------------------------------------
class Stepper:
    """One configuration's decode loop: prefill once, then ``step()`` = one greedy token."""

    def __init__(self, name: str, start, step):
        self.name, self._start, self._step = name, start, step
        self.times: list[float] = []

    def start(self) -> None:
        self.state = self._start()

    def run(self, n: int, untimed: int = 0) -> None:
        """n timed steps after ``untimed`` ones (the first steps after another configuration ran
        can meet its thread pool still spin-waiting on the cores)."""
        for i in range(untimed + n):
            t = time.perf_counter()
            self.state = self._step(self.state)
            if i >= untimed:
                self.times.append(time.perf_counter() - t)


def ort_stepper(name: str, dec, prompt: list[int], memory, mode: str, capacity: int) -> Stepper:
    """mode: "cache" (KVCache, shared buffer), "bound" (present kept in onnxruntime), "numpy" (sess.run)."""
    from edgekv.runtime.decoder import BoundPast, past_from_memory

    def start():
        ids = np.asarray([prompt], np.int64)
        if mode == "cache":
            past = dec.new_cache(capacity, *(memory if memory is not None else (None, None)))
            logits, past = dec.forward(ids, past)
        elif mode == "bound":
            past = dec.empty_past() if memory is None else past_from_memory(*memory)
            logits, past = dec.forward(ids, past)
            assert isinstance(past, BoundPast)
        else:
            past = dec.empty_past() if memory is None else past_from_memory(*memory)
            logits, past = dec.forward_numpy(ids, past)
        return logits, past

    def step(state):
        logits, past = state
        tok = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
        return dec.forward_numpy(tok, past) if mode == "numpy" else dec.forward(tok, past)

    return Stepper(name, start, step)


def torch_stepper(model, prompt: list[int], memory) -> Stepper:
    import torch
    from transformers import DynamicCache

    def start():
        cache = DynamicCache()
        if memory is not None:
            for layer in range(memory[0].shape[0]):
                cache.update(torch.from_numpy(memory[0][layer][None]), torch.from_numpy(memory[1][layer][None]), layer)
        p = 0 if memory is None else memory[0].shape[2]
        with torch.no_grad():
            return model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(p, p + len(prompt))[None])

    def step(out):
        with torch.no_grad():
            return model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)

    return Stepper("pytorch_eager_fp32", start, step)


def interleave(steppers: list[Stepper], rounds: int, tokens: int) -> dict[str, float]:
    """Median ms/token of each stepper, run ``tokens`` at a time (after one untimed) in turn for
    ``rounds`` rounds."""
    for s in steppers:
        s.start()
        s.run(2)  # warm-up
        s.times.clear()
    for _ in range(rounds):
        for s in steppers:
            s.run(tokens, untimed=1)
    return {s.name: float(np.median(s.times) * 1000) for s in steppers}


# --- accuracy -------------------------------------------------------------------------
def top1_agreement(bb, artifacts: dict[str, str], threads: int, ggufs: dict[str, str] | None = None) -> dict:
    """Teacher-forced: each text in one forward; fraction of positions whose argmax equals PyTorch fp32's.
    ``ggufs``: llama.cpp files measured on the same token ids (as ``llama_cpp_<type>``)."""
    import torch

    from edgekv.runtime.decoder import DecoderSession

    s = bb.shape
    ids = [list(bb.tokenizer(t).input_ids) for t in TEXTS]
    with torch.no_grad():
        ref = [bb.model(input_ids=torch.tensor([x])).logits[0].numpy() for x in ids]
    out: dict = {"num_tokens": int(sum(map(len, ids)))}
    for q, path in (ggufs or {}).items():
        out[f"llama_cpp_{q}"] = llama_cpp_peer.top1(llama_cpp_peer.load(path, threads, logits_all=True), ids, ref)
    for name, art in artifacts.items():
        dec = DecoderSession(os.path.join(art, "model.onnx"), s.num_layers, s.num_kv_heads, s.head_dim, threads)
        hits, worst = [], 0.0
        for x, want in zip(ids, ref, strict=True):
            got = dec.forward_numpy(np.asarray([x], np.int64), dec.empty_past())[0][0]
            hits += list(got.argmax(-1) == want.argmax(-1))
            worst = max(worst, float(np.abs(got - want).max()))
        out[name] = {"top1": float(np.mean(hits)), "max_abs_logit_diff": worst}
    return out


# --- time to first token, part by part ------------------------------------------------
def ttft_parts(rt, query: str, reps: int = 7) -> dict:
    """Median ms of each step Runtime.stream takes before its first token (retrieval with memory):
    the key pass, the search + weighting, reading the entries' slots, writing them into the KV
    buffer (dequantise + rotate), the prefill of the query over them."""
    times: dict[str, list[float]] = {}
    ids = np.asarray([rt.prompt_ids(query)], np.int64)
    for _ in range(reps):
        t = [time.perf_counter()]
        rt.query_key(query)
        t.append(time.perf_counter())
        retrieved = rt.retrieve(query)
        t.append(time.perf_counter())
        entries = rt.read_entries(retrieved)
        t.append(time.perf_counter())
        cache = rt.decoder.acquire_cache(sum(e.k.shape[2] for e in entries) + ids.shape[1] + 1)
        cache.write_entries(entries, np.array([r.alpha for r in retrieved]), rt.memory.calibration.gates, rt.rope,
                            rt.threads)
        t.append(time.perf_counter())
        rt.decoder.forward(ids, cache)
        t.append(time.perf_counter())
        rt.decoder.release_cache(cache)
        for name, a, b in zip(("key_pass", "retrieve_with_key_pass", "read_slots", "write_entries", "prefill"),
                              t[:-1], t[1:], strict=True):
            times.setdefault(name, []).append((b - a) * 1000)
    return {k: float(np.median(v[1:])) for k, v in times.items()}


# --- resident memory (fresh processes) ------------------------------------------------
def median_rss(artifacts: str, memory: str | None, k: int, threads: int, prompt: str, runs: int) -> dict:
    """Fresh interpreters: load the runtime (+ memory) and generate 32 tokens; peak RSS (common.child_rss)."""
    body = ("from edgekv.runtime import Runtime\n"
            f"rt = Runtime.load({artifacts!r}, memory={memory!r}, k={k}, threads={threads})\n"
            f"r = rt.generate({prompt!r}, max_new_tokens=32)\n")
    return child_rss(body, "{'tokens': len(r.token_ids), 'retrieved': len(r.retrieved)}", runs)


# --- the run --------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per configuration per round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="decode measurements (fresh loops, shuffled order)")
    ap.add_argument("--rss-runs", type=int, default=3)
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when it is installed")
    ap.add_argument("--prepare", action="store_true",
                    help="only build the cached exports, memories and llama.cpp files (untimed; may run beside other work)")
    args = ap.parse_args()

    import torch

    from edgekv.host.models import load_backbone
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import DecoderSession

    torch.set_num_threads(args.threads)
    t_start = time.time()
    bb = load_backbone("smollm2-135m")
    s = bb.shape
    art = exports()
    art.update({name: variant_export(bb, name) for name in VARIANTS})
    os.makedirs(CACHE, exist_ok=True)
    facts_small, facts_big = os.path.join(CACHE, "perf-facts-10MB.ekv"), os.path.join(CACHE, "perf-facts-1GB.ekv")
    build_memory(facts_small, bb, FACTS, 64, 10 * 10**6)
    build_memory(facts_big, bb, FACTS, 64, 10**9)
    docs_mem = os.path.join(CACHE, "perf-docs.ekv")
    docs = [long_doc(i) for i in range(len(SITES))]
    build_memory(docs_mem, bb, docs, 256)
    if args.prepare:
        if llama_cpp_peer.available():
            llama_cpp_peer.gguf_files(CACHE)
        print(f"prepared: {sorted(art)} and the memories under {CACHE}")
        return
    res: dict = {"machine": machine(), "threads": args.threads, "model": "smollm2-135m", "targets": TARGETS,
                 "load_average_at_start": os.getloadavg(), "decode": {"tokens_per_round": args.tokens,
                                                                       "rounds": args.rounds}}

    # 1. bandwidth (again before and after every decode repeat: it drifts with the host's load)
    bw = read_bandwidth(args.threads)
    res["bandwidth"] = bw
    bw_samples = [bw["best_gb_s"]]
    rt = Runtime.load(art["fp32"], threads=args.threads, k=0)
    prompt = rt.prompt_ids(QUERY)
    rng = np.random.default_rng(0)
    mem1024 = rt.rotate(rng.normal(size=(s.num_layers, s.num_kv_heads, 1024, s.head_dim)).astype(np.float32),
                        0.1 * rng.normal(size=(s.num_layers, s.num_kv_heads, 1024, s.head_dim)).astype(np.float32))

    # 2. decode, interleaved: every configuration with 0 and 1,024 memory tokens
    decs = {w: DecoderSession(os.path.join(art[w], "model.onnx"), s.num_layers, s.num_kv_heads, s.head_dim,
                              args.threads) for w in (*WEIGHTS, "optimum-fp32", *VARIANTS)}
    capacity = 1024 + len(prompt) + (args.rounds + 1) * args.tokens + 8
    ggufs: dict[str, str] = {}
    if not args.no_llama_cpp:
        if llama_cpp_peer.available():
            ggufs = llama_cpp_peer.gguf_files(CACHE)
        else:
            print("llama.cpp peer left out: llama-cpp-python is not installed (make bench-deps)", file=sys.stderr)
    llamas = {q: llama_cpp_peer.load(path, args.threads) for q, path in ggufs.items()}
    res["llama_cpp"] = {"files": {q: os.path.basename(p) for q, p in ggufs.items()},
                        "version": __import__("llama_cpp").__version__ if ggufs else None}
    runs = []
    for rep in range(args.repeats):  # fresh decode loops each time; the median over repeats is reported
        steppers = []
        for tag, mem in (("", None), ("+1024mem", mem1024)):
            steppers += [ort_stepper(f"edgekv_{w}{tag}", decs[w], prompt, mem, "cache", capacity) for w in WEIGHTS]
            steppers += [ort_stepper(f"edgekv_fp32_numpy_loop{tag}", decs["fp32"], prompt, mem, "numpy", capacity),
                         ort_stepper(f"optimum_fp32_numpy_loop{tag}", decs["optimum-fp32"], prompt, mem, "numpy",
                                     capacity),
                         ort_stepper(f"optimum_fp32_iobinding{tag}", decs["optimum-fp32"], prompt, mem, "bound",
                                     capacity)]
        steppers += [ort_stepper(f"edgekv_{name}", decs[name], prompt, None, "cache", capacity) for name in VARIANTS]
        steppers.append(torch_stepper(bb.model, prompt, None))
        steppers += [llama_cpp_peer.stepper(f"llama_cpp_{q}", llm, prompt) for q, llm in llamas.items()]
        order = np.random.default_rng(rep).permutation(len(steppers))  # no configuration always follows another
        runs.append(interleave([steppers[i] for i in order], args.rounds, args.tokens))
        bw_samples.append(read_bandwidth(args.threads, reps=3)["best_gb_s"])
    ms = {name: float(np.median([r[name] for r in runs])) for name in runs[0]}
    # each repeat against the faster of the bandwidths measured just before and just after it
    bw_repeat = [max(a, b) for a, b in zip(bw_samples[:-1], bw_samples[1:], strict=True)]
    bw["around_repeats_gb_s"] = bw_samples
    bw["best_gb_s"] = float(np.median(bw_repeat))
    res["decode"]["repeats"] = runs
    res["decode"]["ms_per_token"] = ms
    context = len(prompt) + (args.rounds * args.tokens) // 2  # mean context during the timed steps
    floor = {}
    for w in (*WEIGHTS, "optimum-fp32", *VARIANTS):
        wb = weight_bytes_per_token(art[w])
        for tag, extra in (("", 0), ("+1024mem", 1024)):
            b = wb + kv_bytes(s, context + extra)
            floor[w + tag] = {"bytes_per_token": b, "floor_ms": b / (bw["best_gb_s"] * 1e9) * 1000}
    res["floor"] = floor
    f32 = ms["edgekv_fp32"]
    per_repeat = [r["edgekv_fp32"] / (floor["fp32"]["bytes_per_token"] / (b * 1e9) * 1000)
                  for r, b in zip(runs, bw_repeat, strict=True)]
    if llamas:  # per repeat (same interleaved run), and their range
        per = {f"{w}_over_{q}": [r[f"edgekv_{w}"] / r[f"llama_cpp_{q}"] for r in runs] for w, q in LLAMA_PEERS.items()}
        res["over_llama_cpp"] = {k: {"median": float(np.median(v)), "min": min(v), "max": max(v), "per_repeat": v}
                                 for k, v in per.items()}
    res["ratios"] = {
        "fp32_over_floor": float(np.median(per_repeat)),
        "fp32_over_floor_per_repeat": per_repeat,
        "optimum_fp32_numpy_over_floor": ms["optimum_fp32_numpy_loop"] / floor["optimum-fp32"]["floor_ms"],
        "speedup_over_fp32": {w: f32 / ms[f"edgekv_{w}"] for w in ("int8", "int4", *VARIANTS)},
        "memory_1024_over_0": {name: ms[f"{name}+1024mem"] / ms[name] for name in ms if f"{name}+1024mem" in ms},
        "fp32_over_pytorch_eager": ms["pytorch_eager_fp32"] / f32,
    }

    # 3. accuracy
    res["top1_vs_pytorch_fp32"] = top1_agreement(bb, {w: art[w] for w in (*WEIGHTS, *VARIANTS)}, args.threads, ggufs)

    # 4. time to first token: 4 documents of 256 memory tokens each vs the same documents as prompt text
    ttft: dict = {}
    for w, chat in (("fp32", True), ("int4", True), ("fp32", False)):
        name = w if chat else f"{w}_no_chat_template"
        with Runtime.load(art[w], memory=docs_mem, k=4, threads=args.threads, chat=chat) as rt_mem, \
                Runtime.load(art[w], threads=args.threads, k=0, chat=chat) as rt_text:
            retrieved = rt_mem.retrieve(DOC_QUERY)
            shown = [docs[int(r.source_id[2:])] for r in retrieved]
            as_text = "\n".join(f"Q: {q}\nA: {a}" for q, a in shown) + "\n\n" + DOC_QUERY
            inj, txt = [], []
            for _ in range(10):  # interleaved; the first of each warms up
                inj.append(rt_mem.generate(DOC_QUERY, max_new_tokens=1).ttft_ms)
                time.sleep(0.2)  # neither meets the other runtime's thread pool still spin-waiting
                txt.append(rt_text.generate(as_text, max_new_tokens=1).ttft_ms)
                time.sleep(0.2)
            r = rt_mem.generate(DOC_QUERY, max_new_tokens=1)
            parts = ttft_parts(rt_mem, DOC_QUERY)
            t_inj, t_txt = float(np.median(inj[1:])), float(np.median(txt[1:]))
            ttft[name] = {"injected_ms": t_inj, "as_prompt_text_ms": t_txt, "ratio_text_over_injected": t_txt / t_inj,
                          "memory_tokens": r.num_memory_tokens, "prompt_text_tokens": len(rt_text.prompt_ids(as_text)),
                          "query_tokens": r.num_prompt_tokens, "best_entry_is_right": retrieved[-1].source_id == "ex0",
                          "injected_parts_ms": parts}
            if name == "int4" and llamas:  # llama.cpp prefilling the same prompt text (its own way to use the docs)
                text_ids = rt_text.prompt_ids(as_text)
                ttft[name]["llama_cpp_as_prompt_text_ms"] = {
                    q: float(np.median([llama_cpp_peer.ttft_ms(llm, text_ids) for _ in range(4)][1:]))
                    for q, llm in llamas.items()}
    res["ttft"] = ttft

    # 5. resident memory: fresh processes, k=4, the facts memory
    rss = {w: median_rss(art[w], facts_small, 4, args.threads, QUERY, args.rss_runs) for w in (*WEIGHTS, "optimum-fp32")}
    rss["int4_1GB_memory"] = median_rss(art["int4"], facts_big, 4, args.threads, QUERY, args.rss_runs)
    rss["fp32_1GB_memory"] = median_rss(art["fp32"], facts_big, 4, args.threads, QUERY, args.rss_runs)
    for q, path in ggufs.items():
        rss[f"llama_cpp_{q}"] = llama_cpp_peer.median_rss(path, args.threads, prompt, args.rss_runs)
    res["rss"] = rss
    res["memory_files"] = {"small_bytes": os.path.getsize(facts_small), "big_bytes": os.path.getsize(facts_big),
                           "big_bytes_on_disk": os.stat(facts_big).st_blocks * 512}
    peak = {k: v["peak_rss_bytes"] for k, v in rss.items()}
    res["ratios"].update({
        "rss_over_fp32": {w: peak[w] / peak["fp32"] for w in ("int8", "int4", "optimum-fp32")},
        "rss_over_llama_cpp": {f"{w}_over_{q}": peak[w] / peak[f"llama_cpp_{q}"]
                               for w, q in LLAMA_PEERS.items() if f"llama_cpp_{q}" in peak},
        "rss_1GB_over_10MB": {"int4": peak["int4_1GB_memory"] / peak["int4"],
                              "fp32": peak["fp32_1GB_memory"] / peak["fp32"]},
    })
    res["files_bytes"] = {w: sum(os.path.getsize(os.path.join(art[w], n)) for n in os.listdir(art[w])
                                 if n.endswith((".onnx", ".onnx.data", ".onnx_data"))) for w in art}
    res["load_average_at_end"] = os.getloadavg()
    res["seconds"] = time.time() - t_start
    res["verdict"] = verdict(res)
    path = write_json("perf.json", res)
    plot(res, path.replace(".json", ".png"))
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(markdown(res))
    print(json.dumps({"ratios": res["ratios"], "ms_per_token": ms, "top1": res["top1_vs_pytorch_fp32"],
                      "ttft": ttft, "verdict": res["verdict"]}, indent=2))


def verdict(res: dict) -> dict:
    """Each Must-show target of issue 17: the measured figure, the goal, and whether it is met."""
    r, t = res["ratios"], res["targets"]
    top1 = res["top1_vs_pytorch_fp32"]
    out = {"fp32_within_floor": (r["fp32_over_floor"], t["fp32_over_floor"], r["fp32_over_floor"] <= t["fp32_over_floor"])}
    for w, q in LLAMA_PEERS.items():
        if f"llama_cpp_{q}" not in top1:
            continue
        ratio, acc_ok = res["over_llama_cpp"][f"{w}_over_{q}"]["median"], top1[w]["top1"] >= top1[f"llama_cpp_{q}"]["top1"]
        out[f"{w}_over_llama_cpp_{q}"] = (ratio, t["over_llama_cpp"], ratio <= t["over_llama_cpp"] and acc_ok)
        out[f"{w}_top1_minus_llama_cpp_{q}"] = (top1[w]["top1"] - top1[f"llama_cpp_{q}"]["top1"], 0.0, acc_ok)
    for key, ratio in r.get("rss_over_llama_cpp", {}).items():
        if key.startswith("int4"):
            out[f"rss_{key}"] = (ratio, t["rss_over_llama_cpp"], ratio <= t["rss_over_llama_cpp"])
    for w in ("fp32", "int4"):
        mc = r["memory_1024_over_0"][f"edgekv_{w}"]
        out[f"memory_1024_cost_{w}"] = (mc, t["memory_cost_ratio"], mc <= t["memory_cost_ratio"])
    for name in ("fp32", "int4"):
        tt = res["ttft"][name]["ratio_text_over_injected"]
        out[f"ttft_ratio_{name}"] = (tt, t["ttft_ratio"], tt >= t["ttft_ratio"])
    rf = r["rss_1GB_over_10MB"]["int4"]
    out["rss_1GB_vs_10MB_int4"] = (rf, 1 + t["rss_file_size"], abs(rf - 1) <= t["rss_file_size"])
    return {k: {"measured": v[0], "goal": v[1], "met": bool(v[2])} for k, v in out.items()}


def markdown(res: dict) -> str:
    """The tables of docs/performance.md section 6, from a perf.json."""
    mib = 2 ** 20
    bw, v, ms, fl = res["bandwidth"], res["verdict"], res["decode"]["ms_per_token"], res["floor"]
    around = ", ".join(f"{b:.1f}" for b in bw.get("around_repeats_gb_s", []))
    lines = [f"Run: {res['machine']['cpus']} CPUs, {res['threads']} threads; load average "
             f"{res['load_average_at_start'][0]:.2f} at start, {res['load_average_at_end'][0]:.2f} at end; read "
             f"bandwidth {bw['best_gb_s']:.1f} GB/s (median over the decode repeats of the faster of the bandwidths "
             f"measured just before and after each; all: {around}; at start numpy sum {bw['numpy_sum']:.1f}, numpy dot "
             f"{bw['numpy_dot']:.1f}, onnxruntime GEMV {bw['onnxruntime_gemv']:.1f}).", "",
             "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    names = {"fp32_within_floor": "fp32 decode / bandwidth floor (median of the repeats)",
             "int4_over_llama_cpp_q4_1": "int4 ms/token / llama.cpp Q4_1's (median of the repeats), at top-1 >= its",
             "int8_over_llama_cpp_q8_0": "int8 ms/token / llama.cpp Q8_0's (median of the repeats), at top-1 >= its",
             "int4_top1_minus_llama_cpp_q4_1": "int4 top-1 minus llama.cpp Q4_1's (vs PyTorch fp32)",
             "int8_top1_minus_llama_cpp_q8_0": "int8 top-1 minus llama.cpp Q8_0's (vs PyTorch fp32)",
             "rss_int4_over_q4_1": "int4 peak RSS / llama.cpp Q4_1's",
             "ttft_ratio_fp32": "TTFT as text / injected (fp32, chat template, 1,024 memory tokens)",
             "ttft_ratio_int4": "TTFT as text / injected (int4, chat template, 1,024 memory tokens)",
             "memory_1024_cost_fp32": "fp32 decode with 1,024 memory tokens / none",
             "memory_1024_cost_int4": "int4 decode with 1,024 memory tokens / none",
             "rss_1GB_vs_10MB_int4": "int4 peak RSS, 1 GB / 10 MB memory file"}
    for key, row in v.items():
        goal = row["goal"]
        op = "<=" if key == "fp32_within_floor" or "over" in key or key.startswith("memory_") \
            else "within" if key.startswith("rss_1GB") else ">="
        lines.append(f"| {names.get(key, key)} | {row['measured']:.3f} | {op} {goal} | {'yes' if row['met'] else 'no'} |")
    for key, o in res.get("over_llama_cpp", {}).items():
        per = ", ".join(f"{x:.2f}" for x in o["per_repeat"])
        lines.append(f"\n{key.replace('_over_', ' / llama.cpp ')} per repeat: {per} (range {o['min']:.2f}-{o['max']:.2f})")
    lines += ["", "| decode (ms/token, median of interleaved steps) | none | +1,024 memory tokens | ratio | bytes/token "
                  "| floor ms |", "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted((n for n in ms if "+1024mem" not in n), key=lambda n: (not n.startswith("edgekv"), n)):
        w = "optimum-fp32" if name.startswith("optimum") else next(
            (w for w in (*VARIANTS, *WEIGHTS) if name.startswith(f"edgekv_{w}")), None)
        mem, floor = ms.get(name + "+1024mem"), fl.get(w) if w else None
        cells = [name, f"{ms[name]:.2f}", "" if mem is None else f"{mem:.2f}",
                 "" if mem is None else f"{mem / ms[name]:.2f}",
                 "" if floor is None else f"{floor['bytes_per_token'] / 1e6:.0f} MB",
                 "" if floor is None else f"{floor['floor_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    top1, rss, files = res["top1_vs_pytorch_fp32"], res["rss"], res["files_bytes"]
    f32 = rss["fp32"]["peak_rss_bytes"]
    lines += ["", f"| weights | top-1 ({top1['num_tokens']} tokens) | max abs logit diff | peak RSS | / fp32 | files |",
              "| --- | --- | --- | --- | --- | --- |"]
    for w in WEIGHTS:
        lines.append(f"| {w} | {top1[w]['top1']:.3f} | {top1[w]['max_abs_logit_diff']:.2f} | "
                     f"{rss[w]['peak_rss_bytes'] / mib:.0f} MiB | {rss[w]['peak_rss_bytes'] / f32:.3f} | "
                     f"{files[w] / mib:.0f} MiB |")
    for q in LLAMA_PEERS.values():
        if f"llama_cpp_{q}" in top1:
            c, p = top1[f"llama_cpp_{q}"], rss[f"llama_cpp_{q}"]["peak_rss_bytes"]
            lines.append(f"| llama.cpp {q.upper()} ({res['llama_cpp']['files'][q]}) | {c['top1']:.3f} | "
                         f"{c['max_abs_logit_diff']:.2f} | {p / mib:.0f} MiB | {p / f32:.3f} | |")
    what = {CEILING: "int4 kernel ceiling (integer zero points, int8 activations; not shipped)",
            "int4_int8_act": "int4, int8 activations in every linear (Q4_1 float offsets; not shipped)"}
    for name in VARIANTS:
        c = top1[name]
        lines.append(f"| {what[name]} | {c['top1']:.3f} | {c['max_abs_logit_diff']:.2f} | | | "
                     f"{files[name] / mib:.0f} MiB |")
    lines.append(f"| optimum fp32 (issue 3) | | | {rss['optimum-fp32']['peak_rss_bytes'] / mib:.0f} MiB | "
                 f"{rss['optimum-fp32']['peak_rss_bytes'] / f32:.2f} | {files['optimum-fp32'] / mib:.0f} MiB |")
    r = res["ratios"]["rss_1GB_over_10MB"]
    lines.append(f"| 1 GB memory file (int4 / fp32) | | | {rss['int4_1GB_memory']['peak_rss_bytes'] / mib:.0f} / "
                 f"{rss['fp32_1GB_memory']['peak_rss_bytes'] / mib:.0f} MiB | ratio to 10 MB: {r['int4']:.3f} / "
                 f"{r['fp32']:.3f} | |")
    lines += ["", "| time to first token | injected (ms) | as prompt text (ms) | ratio | query tokens | text tokens | "
                  "injected: key pass / read slots / write KV / prefill (ms) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in res["ttft"].items():
        p = t.get("injected_parts_ms", {})
        parts = " / ".join(f"{p[k]:.1f}" for k in ("key_pass", "read_slots", "write_entries", "prefill") if k in p)
        lines.append(f"| {name} | {t['injected_ms']:.0f} | {t['as_prompt_text_ms']:.0f} | "
                     f"{t['ratio_text_over_injected']:.1f} | {t['query_tokens']} | {t['prompt_text_tokens']} | {parts} |")
        for q, ms_q in t.get("llama_cpp_as_prompt_text_ms", {}).items():
            lines.append(f"| llama.cpp {q.upper()}, the same prompt text | | {ms_q:.0f} | "
                         f"{ms_q / t['injected_ms']:.1f} (over edgekv {name} injected) | | {t['prompt_text_tokens']} | |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = res["decode"]["ms_per_token"]
    fig, ax = plt.subplots(1, 4, figsize=(22, 5))
    names = [n for n in ms if "+1024mem" not in n]
    colors = ["tab:olive" if CEILING in n else "tab:green" if n.startswith("edgekv") else
              "tab:red" if n.startswith("llama_cpp") else "tab:gray" for n in names]
    ax[0].barh(names, [ms[n] for n in names], color=colors)
    for w, style in (("fp32", "--"), ("int4", ":")):
        ax[0].axvline(res["floor"][w]["floor_ms"], color="k", linestyle=style, label=f"{w} bandwidth floor")
    ax[0].set_xlabel("ms / token")
    ax[0].set_title(f"decode, SmolLM2-135M, {res['threads']} threads")
    ax[0].legend(fontsize=7)
    top1 = res["top1_vs_pytorch_fp32"]
    rss = res["rss"]
    cols = [*WEIGHTS, *(f"llama_cpp_{q}" for q in LLAMA_PEERS.values() if f"llama_cpp_{q}" in top1)]
    x = np.arange(len(cols))
    ax[1].bar(x - 0.2, [top1[w]["top1"] for w in cols], 0.4, label="top-1 agreement vs PyTorch fp32")
    ax[1].bar(x + 0.2, [rss[w]["peak_rss_bytes"] / rss["fp32"]["peak_rss_bytes"] for w in cols], 0.4,
              label="peak RSS / edgekv fp32's")
    ax[1].set_xticks(x, [c.replace("llama_cpp_", "llama.cpp\n") for c in cols], fontsize=7)
    ax[1].set_title("weights: accuracy and resident memory")
    ax[1].legend(fontsize=7)
    t = res["ttft"]
    labels, values, colors = [], [], []
    for name, row in t.items():
        short = name.replace("_no_chat_template", "\n(no template)")
        labels += [f"{short}\ninjected", f"{short}\nas text"]
        values += [row["injected_ms"], row["as_prompt_text_ms"]]
        colors += ["tab:green", "tab:gray"]
    ax[2].bar(labels, values, color=colors)
    ax[2].tick_params(axis="x", labelsize=6)
    ax[2].set_yscale("log")
    ax[2].set_ylabel("ms")
    ax[2].set_title(f"time to first token, {t['fp32']['memory_tokens']} memory tokens "
                    f"({t['fp32']['ratio_text_over_injected']:.0f}x)")
    mem = res["ratios"]["memory_1024_over_0"]
    ax[3].barh(list(mem), list(mem.values()), color="tab:purple")
    ax[3].axvline(res["targets"]["memory_cost_ratio"], color="k", linestyle="--", label="target")
    ax[3].set_xlabel("decode cost with 1,024 memory tokens / with none")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
