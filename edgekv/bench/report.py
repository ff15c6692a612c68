"""Benchmark outputs: results.json, results.md (tables), and plots (matplotlib, Agg).

* ``heatmap_<method>[_<budget>].png``: the accuracy matrix A (rows: after task i,
  columns: task j) of every run;
* ``accuracy_vs_budget.png``: Last and Avg against deployed bytes for the methods run at
  several budgets;
* ``last_vs_bytes.png``: Last with its 95 % interval against deployed bytes after the last
  task, a point per method at the main budget and a line per swept method (grid reports too);
* ``last_vs_ttft.png``: Last with its interval against the median device time to first token
  (p25-p75 bars; host torch medians when the device figure is missing).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence

from edgekv.units import format_size


def portable_path(path: str, cwd: str | None = None) -> str:
    """``path`` (absolute, or relative to ``cwd``, default the working directory) relative to
    ``cwd`` when it lies under it, else the folder's name alone: what a report records
    instead of a machine's absolute path."""
    base = os.path.abspath(cwd or os.getcwd())
    full = os.path.normpath(os.path.join(base, path))
    if os.path.commonpath([full, base]) == base:
        return os.path.relpath(full, base)
    return os.path.basename(full.rstrip(os.sep)) or full


def portable_command(command: str, cwd: str | None = None) -> str:
    """The command line as typed, its ``--out`` value made :func:`portable_path`."""
    try:
        parts = shlex.split(command)
    except ValueError:  # not a shell line we wrote: leave it as it is
        return command
    for i, a in enumerate(parts):
        if a == "--out" and i + 1 < len(parts):
            parts[i + 1] = portable_path(parts[i + 1], cwd)
        elif a.startswith("--out="):
            parts[i] = "--out=" + portable_path(a[len("--out="):], cwd)
    return shlex.join(parts)


def ttft_summary(ttft: dict[str, float]) -> dict:
    """Median time to first token per method (``<method>_s``), and prompt-text over InduceKV."""
    out = dict(ttft)
    pt, ik = out.get("prompt-text_s"), out.get("induce_s")
    out["prompt_text_over_induce"] = pt / ik if pt is not None and ik else None
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


# ---------------------------------------------------------------------------------
# intervals (edgekv.bench.stats.aggregate): mean [95 % bootstrap interval] cells
# ---------------------------------------------------------------------------------
METRIC_NAMES = (("avg", "Avg"), ("last", "Last"), ("bwt", "BWT"), ("forgetting", "Forgetting"))


def ci_cell(d: dict | None, signed: bool = False) -> str:
    """{"mean", "lo", "hi"} -> '39.6 [31.2, 47.9]' (percent or signed points; '-' where undefined)."""
    if not d or d.get("mean") is None:
        return "-"
    f = _signed if signed else _pct
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def _budget_label(budget: int | None) -> str:
    return "-" if budget is None else format_size(budget)


def interval_tables(agg: dict, main_budget: int) -> list[str]:
    """One table per budget (methods without a budget, e.g. zero-shot, join the main budget's)."""
    b = agg["bootstrap"]
    how = b["resampling"] if len(agg["runs"]) > 1 else "this run's evaluated queries of each task resampled"
    lines = [f"Cells: mean over {len(agg['runs'])} run{'s' if len(agg['runs']) > 1 else ''} "
             f"[{round(100 * b['level'])} % bootstrap interval: {how}; {b['num_boot']} samples].", ""]
    budgets = sorted({m["budget"] for m in agg["methods"] if m["budget"] is not None} | {main_budget})
    for budget in budgets:
        rows = [m for m in agg["methods"] if m["budget"] == budget or (m["budget"] is None and budget == main_budget)]
        if not rows:
            continue
        lines += [f"### Budget {format_size(budget)} ({budget} B){' (main)' if budget == main_budget else ''}", "",
                  "| method | runs | " + " | ".join(n for _, n in METRIC_NAMES) + " | deployed bytes |",
                  "|---" * (len(METRIC_NAMES) + 3) + "|"]
        for m in rows:
            cells = [ci_cell(m["metrics"][k], signed=k in ("bwt", "forgetting")) for k, _ in METRIC_NAMES]
            dep = sorted(set(m["deployed_bytes"]))
            lines.append(f"| {m['method']} | {len(m['runs'])} | " + " | ".join(cells) +
                         f" | {', '.join(str(x) for x in dep)}{'' if m['bytes_constant'] else ' (changed)'} |")
        lines.append("")
    return lines


def paired_table(agg: dict) -> list[str]:
    """reference - method at the main budget: mean [interval] and the verdict about the reference."""
    p = agg["paired"]
    if not p["methods"]:
        return []
    ref = p["reference"]
    lines = [f"### Paired differences at {format_size(p['budget'])}: {ref} minus each method", "",
             f"Same runs and test queries resampled jointly; percentage points. '{ref} better' / "
             f"'{ref} worse': the 95 % interval excludes 0 (for Forgetting, lower is better); "
             "'cannot tell': it contains 0, so these runs do not separate the two.", "",
             "| method | " + " | ".join(n for _, n in METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for m in p["methods"]:
        cells = []
        for k, _ in METRIC_NAMES:
            d = m["metrics"][k]
            v = d["verdict"] if d["verdict"] == "cannot tell" else f"{ref} {d['verdict']}"
            cells.append(f"{ci_cell(d, signed=True)} {v}" if d["mean"] is not None else "-")
        at = "" if m["budget"] is None else f" @ {format_size(m['budget'])}"
        lines.append(f"| {m['method']}{at} | " + " | ".join(cells) + " |")
    return lines + [""]


def per_run_table(agg: dict) -> list[str]:
    """Avg / Last / BWT of every (method, budget) in every run."""
    labels = agg["runs"]
    lines = ["| method | budget | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for m in agg["methods"]:
        by = dict(zip(m["runs"], m["per_run"], strict=True))
        cells = [" / ".join((_pct(by[lab]["avg"]), _pct(by[lab]["last"]), _signed(by[lab]["bwt"])))
                 if lab in by else "-" for lab in labels]
        lines.append(f"| {m['method']} | {_budget_label(m['budget'])} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: Avg / Last / BWT (%, points) of each run.", ""]


# ---------------------------------------------------------------------------------
# tuning, device TTFT, ladder: sections of results.md
# ---------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def tuning_table(tuning: dict | None) -> list[str]:
    """The tuning grid of every tuned method on val, its metrics and the chosen point."""
    if not tuning:
        return []
    lines = ["## Tuning on val", "",
             f"Stream {tuning['stream'] or '(first)'}, seed {tuning['seed']}, split val, at "
             f"{format_size(tuning['budget'])}; rule: {tuning['rule']}. Every test run of the method uses the "
             "chosen values.", "",
             "| method | lr | epochs | val Last | val Avg | learn s | chosen |", "|---|---|---|---|---|---|---|"]
    for name, d in tuning["methods"].items():
        for p in d["grid"]:
            chosen = (p["lora_lr"], p["lora_epochs"]) == (d["chosen"]["lora_lr"], d["chosen"]["lora_epochs"])
            lines.append(f"| {name} | {p['lora_lr']:g} | {p['lora_epochs']} | {_pct(p['metrics']['last'])} | "
                         f"{_pct(p['metrics']['avg'])} | {p['seconds']['learn']:.0f} | {'**yes**' if chosen else ''} |")
    return lines + [""]


def device_ttft_table(ttft: dict | None) -> list[str]:
    """Median and p25-p75 device TTFT per method, the ratio to InduceKV, prompt and memory tokens;
    with image queries (a vision-language model) one row per method and kind of query, and the
    image tokens of the prompt."""
    if not ttft:
        return []
    head = ["## Time to first token on the device runtime", ""]
    if ttft.get("error") or not ttft.get("methods"):
        return head + [f"Not measured: {ttft.get('error') or 'no method state'}.", ""]
    ref = ttft.get("reference")
    n_img = int(ttft.get("image_queries") or 0)
    queries = f"{ttft.get('queries')} text" + (f" + {n_img} image" if n_img else "") + " queries"
    lines = head + [f"onnxruntime runtime ({ttft.get('weights')} weights, {ttft.get('threads')} threads), "
                    f"{queries} x {ttft.get('repeats')} passes, the methods interleaved "
                    "query by query, from the query text to the first token's logits (edgekv.bench.device); each "
                    "method's state after the last task at the main budget, first run. Tokens: mean per query. "
                    "The host torch TTFT is a secondary figure."]
    if n_img:
        lines.append("Image queries (their own image, encoded inside the timed call) are reported apart from text "
                     "queries; ratios are to the reference on the same kind of query; image tokens: prompt positions "
                     "holding image features (the query's and its shots'), part of the prompt tokens.")
    lines.append("")

    def row(name: str, kind: str, r: dict, which: str | None) -> str:
        ratio = r.get(f"over_{ref}") if ref else None
        times = "- | -" if r.get("median_ms") is None else f"{r['median_ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f}"
        cells = [name, kind] + ([which] if which else []) + [times, _fmt(ratio, ".2f"), _fmt(r.get("prompt_tokens"))] \
            + ([_fmt(r.get("image_tokens"))] if which else []) + [_fmt(r.get("memory_tokens"))]
        return "| " + " | ".join(cells) + " |"

    if not n_img:
        lines += [f"| method | kind | median ms | p25-p75 ms | over {ref or '-'} | prompt tokens | memory tokens |",
                  "|---|---|---|---|---|---|---|"]
        lines += [row(name, r["kind"], r, None) for name, r in ttft["methods"].items()]
        return lines + [""]
    lines += [f"| method | kind | queries | median ms | p25-p75 ms | over {ref or '-'} | prompt tokens | image tokens | "
              "memory tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in ttft["methods"].items():
        if r.get("n"):
            lines.append(row(name, r["kind"], r, "text"))
        if r.get("image"):
            lines.append(row(name, r["kind"], r["image"], "image"))
    return lines + [""]


def ladder_section(ladder: dict | None) -> list[str]:
    """The ladder's accuracy per rung over every query (the per-task table is in ladder/ladder.md)."""
    if not ladder:
        return []
    rungs = ladder["rungs"]
    return ["## Accuracy ladder (first run)", "",
            f"Accuracy (%) over every query per rung; per task, retrieval precision and the largest drop: "
            f"`{ladder['dir']}/ladder.md`, `{ladder['dir']}/ladder.png`.", "",
            "| " + " | ".join(rungs) + " |", "|---" * len(rungs) + "|",
            "| " + " | ".join(_pct(ladder["all"][r]["accuracy"]) for r in rungs) + " |", ""]


def extra_sections(results: dict) -> list[str]:
    return (tuning_table(results.get("tuning")) + device_ttft_table(results.get("ttft_device"))
            + ladder_section(results.get("ladder")))


def grid_markdown(results: dict) -> str:
    """results.md of several runs (``edgekv.bench.grid``): intervals, paired differences, per run."""
    agg = results["aggregate"]
    runs = results["runs"]
    lines = [f"# edgekv bench: {results['model']}, {len(runs)} runs (streams {', '.join(results['streams'])}; "
             f"seeds {', '.join(str(s) for s in results['seeds'])})", "",
             f"Main budget: {format_size(results['main_budget'])} ({results['main_budget']} B). Evaluated split: "
             f"{runs[0]['eval_split']}; examples per task and run: "
             + "; ".join(f"{r['label']} {r['eval_per_task']}" for r in runs) + ".", "",
             "Accuracy in %; BWT and Forgetting in percentage points (definitions: docs/method.md, "
             "'Continual-learning metrics'; protocol: docs/bench.md).", "", "## Metrics per budget", ""]
    lines += interval_tables(agg, results["main_budget"])
    lines += ["## Paired comparisons", ""] + (paired_table(agg) or ["(no reference method in these runs)", ""])
    lines += extra_sections(results)
    lines += ["## Every run", ""] + per_run_table(agg)
    lines += [f"- {r['label']}: `{r['dir']}/results.md` ({r['seconds_total']} s)" for r in runs]
    lines += ["", f"Command: `{results['command']}`", f"Total time: {results['seconds_total']} s", ""]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The results as Markdown: one row per run, then the accuracy matrices."""
    runs = results["runs"]
    s = results["stream"]
    lines = [f"# edgekv bench: {results['model']} on {s['name'] or 'stream'} ({len(s['tasks'])} tasks)", "",
             f"Tasks in order: {', '.join(s['tasks'])}. {s.get('eval_split', 'test').capitalize()} examples per "
             f"task: {s['val_per_task'] if s.get('eval_split') == 'val' else s['test_per_task']}. "
             f"Main budget: {format_size(results['main_budget'])} ({results['main_budget']} B).", "",
             "Accuracy in %; BWT and Forgetting in percentage points (definitions: "
             "docs/method.md, 'Continual-learning metrics'). Deployed = bytes sent to the device "
             "beyond the frozen backbone, after the last task; constant = identical after every task.", "",
             "| method | budget | Avg | Last | BWT | Forgetting | deployed bytes | constant | host bytes | "
             "learn s | eval s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        info = r["info"][-1] if r["info"] else {}
        notes = []
        if "rank" in info:
            notes.append(f"rank {info['rank']}" + (f", lr {info['lr']:g}, {info['epochs']} ep" if "lr" in info else ""))
        if "num_slots" in info:
            notes.append(f"{info['num_slots']} slots, m {info['pooled_len']} {info['payload_dtype']}")
        if "num_examples" in info:
            notes.append(f"{info['num_examples']} examples stored")
        ttft = results.get("ttft", {}).get(f"{r['method']}_s")
        if ttft is not None and r["budget"] in (None, results["main_budget"]):
            notes.append(f"TTFT {1000 * ttft:.0f} ms")
        budget = "-" if r["budget"] is None else format_size(r["budget"])
        lines.append(f"| {r['method']} | {budget} | {_pct(m['avg'])} | {_pct(m['last'])} | {_signed(m['bwt'])} | "
                     f"{_signed(m['forgetting'])} | {r['deployed_bytes'][-1]} | "
                     f"{'yes' if r['bytes_constant'] else 'no'} | {r['host_bytes'][-1]} | "
                     f"{r['seconds']['learn']:.0f} | {r['seconds']['evaluate']:.0f} | {'; '.join(notes)} |")
    t = results.get("ttft", {})
    if t.get("prompt_text_over_induce") is not None:
        lines += ["", f"Time to first token (median, host torch): prompt-text {1000 * t['prompt-text_s']:.0f} ms, "
                      f"InduceKV {1000 * t['induce_s']:.0f} ms: ratio {t['prompt_text_over_induce']:.2f}."]
    if results.get("aggregate"):  # one run: the intervals resample its queries (edgekv.bench.stats)
        lines += ["", "## Intervals over the evaluated queries", ""] + interval_tables(
            results["aggregate"], results["main_budget"]) + paired_table(results["aggregate"])
    extra = extra_sections(results)
    lines += [""] + extra if extra else []
    lines += ["", "## Deployed bytes after every task", ""]
    for r in runs:
        lines.append(f"- {r['method']} @ {'-' if r['budget'] is None else r['budget']}: "
                     f"{', '.join(str(b) for b in r['deployed_bytes'])}")
    lines += ["", "## Accuracy matrices (rows: after task i; columns: task j; %)", ""]
    for r in runs:
        lines.append(f"### {r['method']} @ {'-' if r['budget'] is None else format_size(r['budget'])}")
        lines.append("")
        lines.append("| after \\ on | " + " | ".join(r["tasks"]) + " |")
        lines.append("|---" * (len(r["tasks"]) + 1) + "|")
        for name, row in zip(r["tasks"], r["A"], strict=True):
            lines.append(f"| {name} | " + " | ".join(_pct(x) for x in row) + " |")
        lines.append("")
    lines += [f"Command: `{results['command']}`", f"Total time: {results['seconds_total']} s", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label(r: dict) -> str:
    return r["method"] if r["budget"] is None else f"{r['method']}_{r['budget']}B"


def heatmap(r: dict, path: str) -> None:
    import numpy as np

    plt = _plt()
    A = np.array([[np.nan if x is None else x for x in row] for row in r["A"]], np.float64)
    T = len(A)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * T, 0.8 + 0.7 * T))
    im = ax.imshow(A, vmin=0, vmax=1, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not np.isnan(A[i, j]):
                ax.text(j, i, f"{100 * A[i, j]:.0f}", ha="center", va="center",
                        color="white" if A[i, j] < 0.5 else "black", fontsize=8)
    ax.set_xticks(range(T))
    ax.set_xticklabels(r["tasks"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(T))
    ax.set_yticklabels([f"after {t}" for t in r["tasks"]], fontsize=8)
    budget = "" if r["budget"] is None else f" @ {format_size(r['budget'])}"
    m = r["metrics"]
    ax.set_title(f"{r['method']}{budget}\nAvg {_pct(m['avg'])}  Last {_pct(m['last'])}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_plot(runs: Sequence[dict], path: str) -> bool:
    """Last and Avg vs deployed bytes for methods with >= 2 budgets; False when none."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        if r["budget"] is not None:
            by.setdefault(r["method"], []).append(r)
    by = {k: sorted(v, key=lambda r: r["budget"]) for k, v in by.items() if len(v) >= 2}
    if not by:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("last", "avg"), strict=True):
        for name, rs in by.items():
            xs = [r["deployed_bytes"][-1] for r in rs]
            ys = [r["metrics"][key] for r in rs]
            ax.plot(xs, [float("nan") if y is None else 100 * y for y in ys], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("deployed bytes after the last task")
        ax.set_ylabel(f"{key.capitalize()} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy vs budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------
# summary plots: Last with its interval against deployed bytes and against TTFT
# ---------------------------------------------------------------------------------
def _last(m: dict) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of Last in % from an aggregate entry, or None."""
    d = m["metrics"]["last"]
    if d.get("mean") is None:
        return None
    y = 100 * d["mean"]
    return y, 100 * d["lo"] if d.get("lo") is not None else y, 100 * d["hi"] if d.get("hi") is not None else y


def _main_entries(results: dict) -> list[dict]:
    agg = results.get("aggregate") or {}
    return [m for m in agg.get("methods", []) if m["budget"] in (None, results["main_budget"]) and _last(m)]


def _colours(results: dict) -> dict[str, str]:
    names = dict.fromkeys(m["method"] for m in (results.get("aggregate") or {}).get("methods", []))
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def last_vs_bytes(results: dict, path: str) -> bool:
    """Last (95 % interval bars) vs deployed bytes after the last task: a point per method at the main
    budget, a line per swept method over its budgets. False when there is nothing to plot."""
    import numpy as np

    main = _main_entries(results)
    if not main:
        return False
    plt, col = _plt(), _colours(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    swept: dict[str, list[dict]] = {}
    for m in results["aggregate"]["methods"]:
        if m["budget"] is not None and _last(m):
            swept.setdefault(m["method"], []).append(m)
    for name, ms in swept.items():
        if len(ms) >= 2:
            ms = sorted(ms, key=lambda m: m["budget"])
            ys = np.array([_last(m) for m in ms])  # [n, 3]
            ax.errorbar([float(np.mean(m["deployed_bytes"])) for m in ms], ys[:, 0],
                        yerr=[ys[:, 0] - ys[:, 1], ys[:, 2] - ys[:, 0]], color=col[name], alpha=0.45, capsize=2,
                        marker=".", linestyle="-", label=f"{name} (budgets)")
    for m in main:
        y, lo, hi = _last(m)
        x = float(np.mean(m["deployed_bytes"]))
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], color=col[m["method"]], fmt="o", capsize=3)
        ax.annotate(m["method"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1024)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("deployed bytes after the last task (0 = the backbone alone)")
    ax.set_ylabel("Last accuracy (%), 95 % interval")
    ax.set_title(f"Last vs bytes (main budget {format_size(results['main_budget'])})", fontsize=10)
    ax.grid(alpha=0.3)
    if any(len(v) >= 2 for v in swept.values()):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ttft_points(results: dict) -> tuple[dict[str, tuple[float, float, float]], str]:
    """method -> (median, p25, p75) ms: the device runtime's, else the host torch medians."""
    dev = results.get("ttft_device") or {}
    if dev.get("methods"):  # the text queries' figures; the image queries' where there is no text query
        pts = {}
        for n, r in dev["methods"].items():
            r = r if r.get("median_ms") is not None else r.get("image") or {}
            if r.get("median_ms") is not None:
                pts[n] = (r["median_ms"], r["p25_ms"], r["p75_ms"])
        text = any(r.get("median_ms") is not None for r in dev["methods"].values())
        return pts, "device runtime" + ("" if text else ", image queries")
    runs = results.get("runs") or [{}]
    host = results.get("ttft") or runs[0].get("ttft") or {}
    return ({k[:-2]: (1000 * v,) * 3 for k, v in host.items() if k.endswith("_s") and isinstance(v, (int, float))},
            "host torch")


def last_vs_ttft(results: dict, path: str) -> bool:
    """Last (95 % interval bars) vs median time to first token (p25-p75 bars) at the main budget."""
    ttft, source = _ttft_points(results)
    main = [m for m in _main_entries(results) if m["method"] in ttft]
    if not main:
        return False
    plt, col = _plt(), _colours(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in main:
        y, lo, hi = _last(m)
        x, p25, p75 = ttft[m["method"]]
        ax.errorbar([x], [y], xerr=[[x - p25], [p75 - x]], yerr=[[y - lo], [hi - y]], color=col[m["method"]],
                    fmt="o", capsize=3)
        ax.annotate(m["method"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"time to first token, median ms ({source}; bars p25-p75)")
    ax.set_ylabel("Last accuracy (%), 95 % interval")
    ax.set_title(f"Last vs time to first token (main budget {format_size(results['main_budget'])})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_plots(results: dict, plots_dir: str) -> dict[str, str]:
    """``last_vs_bytes.png`` and ``last_vs_ttft.png`` in ``plots_dir`` (those with points). -> name -> path"""
    os.makedirs(plots_dir, exist_ok=True)
    out = {}
    for name, fn in (("last_vs_bytes", last_vs_bytes), ("last_vs_ttft", last_vs_ttft)):
        p = os.path.join(plots_dir, f"{name}.png")
        if fn(results, p):
            out[name] = p
    return out


def write_all(results: dict, out_dir: str) -> dict[str, str]:
    """results.json, results.md, heatmaps, accuracy_vs_budget.png, the summary plots. -> name -> path"""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    for r in results["runs"]:
        p = os.path.join(plots, f"heatmap_{run_label(r)}.png")
        heatmap(r, p)
        paths[f"heatmap:{run_label(r)}"] = p
    p = os.path.join(plots, "accuracy_vs_budget.png")
    if budget_plot(results["runs"], p):
        paths["budget_plot"] = p
    paths.update(summary_plots(results, plots))
    results["outputs"] = {k: os.path.relpath(v, out_dir) for k, v in paths.items()}
    if results.get("command"):  # no machine path in the report: --out as typed, made relative
        results["command"] = portable_command(results["command"])
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    return paths
