"""llama.cpp as a peer of edgekv's runtime in ``perf_bench.py``: the same GGUF, the same threads.

llama-cpp-python is built from source on this machine (``make bench-deps``: CPU build, native
instructions; a benchmark dependency only, never in CI or the device install). Its model is the
built-in model's GGUF as shipped (Q4_1 linears, Q8_0 embedding) and the same file requantised
to Q8_0 (``llama_model_quantize``, cached), the counterparts of edgekv's int4 and int8 exports,
which are quantised from the same dequantised GGUF weights.

What it measures, the same way as for edgekv (see perf_bench.py):
  * decode ms/token: a :class:`Stepper` run interleaved with edgekv's (greedy, one token per
    ``eval``; the logits of the last position only);
  * top-1 agreement with PyTorch fp32 over the same teacher-forced token ids (``logits_all``);
  * time to first token of a prompt (prefill + the first token's logits);
  * peak RSS (VmHWM) of a fresh process that loads the model and generates 32 tokens.
"""

from __future__ import annotations

import os
import time

import numpy as np

# llama.cpp's file types (llama.h: enum llama_ftype)
FTYPES = {"q4_1": 3, "q8_0": 7}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_files(cache: str) -> dict[str, str]:
    """{"q4_1": the built-in GGUF as shipped, "q8_0": it requantised to Q8_0 (cached under ``cache``)}."""
    import llama_cpp

    from edgekv.host.models import builtin_gguf

    src = builtin_gguf("smollm2-135m")
    q8 = os.path.join(cache, f"smollm2-135m-q8_0-{os.path.getsize(src)}.gguf")
    if not os.path.isfile(q8):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES["q8_0"]
        params.allow_requantize = True  # the source is already quantised (Q4_1): Q8_0 holds its values closely
        tmp = q8 + ".tmp"
        if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed on {src}")
        os.replace(tmp, q8)
    return {"q4_1": src, "q8_0": q8}


def load(path: str, threads: int, logits_all: bool = False, n_ctx: int = 2048):
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, logits_all=logits_all, verbose=False)


def last_logits(llm) -> np.ndarray:
    """[V] logits of the last evaluated position (read from the context: without ``logits_all``
    llama-cpp-python does not copy them into ``Llama.scores``)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def stepper(name: str, llm, prompt: list[int]):
    """A perf_bench Stepper: prefill ``prompt``, then one greedy token per step."""
    from perf_bench import Stepper

    def start():
        llm.reset()
        llm.eval(prompt)
        return int(last_logits(llm).argmax())

    def step(tok: int) -> int:
        llm.eval([tok])
        return int(last_logits(llm).argmax())

    return Stepper(name, start, step)


def top1(llm, ids: list[list[int]], ref: list[np.ndarray]) -> dict:
    """Teacher-forced: each token list in one eval; fraction of positions whose argmax is PyTorch fp32's
    (``ref``: [T, V] logits per list). ``llm`` was loaded with ``logits_all``."""
    hits, worst = [], 0.0
    for x, want in zip(ids, ref, strict=True):
        llm.reset()
        llm.eval(x)
        got = np.asarray(llm.scores[: len(x)])  # [T, V]
        hits += list(got.argmax(-1) == want.argmax(-1))
        worst = max(worst, float(np.abs(got - want).max()))
    return {"top1": float(np.mean(hits)), "max_abs_logit_diff": worst}


def ttft_ms(llm, prompt: list[int]) -> float:
    """ms from an empty context to the first token's logits (prefill of ``prompt``)."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    int(last_logits(llm).argmax())
    return (time.perf_counter() - t) * 1000


def median_rss(path: str, threads: int, prompt: list[int], runs: int) -> dict:
    """Fresh interpreters: load ``path`` and generate 32 greedy tokens after ``prompt``; peak RSS
    (``common.child_rss``)."""
    from common import child_rss

    body = ("import llama_cpp, numpy as np\n"
            f"llm = llama_cpp.Llama(model_path={path!r}, n_ctx=2048, n_threads={threads}, "
            f"n_threads_batch={threads}, verbose=False)\n"
            f"llm.eval({list(prompt)!r})\n"
            "for _ in range(32):\n"
            "    llm.eval([int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).argmax())])\n")
    return child_rss(body, runs=runs)
