"""``edgekv profile``: budget arithmetic (``--model --budget``), or measurements of real
artifacts on this host (``edgekv profile ARTIFACTS``), with a verdict for a board."""

from __future__ import annotations

import typer

from edgekv.budget import BudgetConfig, budget_report
from edgekv.cli import command, emit, field_option, table
from edgekv.compat import DEFAULT_TOP_K
from edgekv.devices.profiler import ProfileConfig
from edgekv.errors import BudgetError, InputError, MissingDependencyError
from edgekv.format.layout import denser_hint
from edgekv.modelshape import model_shape
from edgekv.units import format_size, parse_size


def _human(d: dict) -> str:
    rows = [
        ("model", f"{d['model_type']}: {d['num_layers']} layers x {d['num_kv_heads']} KV heads x head dim {d['head_dim']}"),
        ("budget", format_size(d["budget_bytes"])),
        ("payload", f"{d['payload_dtype']}, m = {d['pooled_len']} positions per entry"),
        ("slot", format_size(d["slot_bytes"])),
        ("  retrieval key", format_size(d["key_bytes_per_slot"])),
        ("  K payload", format_size(d["k_payload_bytes_per_slot"])),
        ("  V payload", format_size(d["v_payload_bytes_per_slot"])),
        ("  scales", format_size(d["scale_bytes_per_slot"])),
        ("  padding", format_size(d["padding_bytes_per_slot"])),
        ("  table entry", format_size(d["table_bytes_per_slot"])),
        ("fixed overhead", format_size(d["overhead_bytes"])),
        ("slots that fit", d["num_slots"]),
        ("file size", format_size(d["file_bytes"])),
        ("memory KV tokens", f"{d['memory_tokens_per_layer']} per layer with k = {d['top_k']}"),
    ]
    if "device" in d:
        v = d["device"]
        rows += [
            (f"on {v['name']}", "memory and KV fit" if v["memory_and_kv_fit"] else "memory and KV do NOT fit"),
            ("  memory resident", format_size(v["memory_resident_bytes"])),
            ("  KV at max context", format_size(v["kv_bytes_at_max_context"])),
            ("  available RAM", format_size(v["available_bytes"])),
            ("  note", "weights not included; measure with `edgekv profile ARTIFACTS`"),
        ]
    return table(rows)


def _human_measured(d: dict) -> str:
    from edgekv.devices.profiler import PARTS

    t = d["timing"]
    rows = [
        ("artifacts", d["artifacts"]),
        ("memory", d["memory_file"]["path"] if d["memory_file"] else "none"),
        ("peak RSS", f"{format_size(d['peak_rss_bytes'])} (measured, {d['host']['machine']})"),
    ]
    rows += [(f"  {p.replace('_', ' ')}", format_size(d["breakdown_bytes"][p])) for p in PARTS]
    rows += [
        ("context", f"{d['context_tokens']} positions ({d['num_memory_tokens']} memory, k = {d['k']}); "
                    f"model maximum {d['max_context']}"),
        ("retrieval", f"{d['retrieval_mode'] or '-'} ({d['retrieval_reason']})"),
        ("time to first token", f"{t['ttft_ms']:.1f} ms"),
        ("decode", "-" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:.1f} tokens/s"),
        ("decode at context", f"{d['decode_ms_at_context']:.1f} ms/token"),
        ("host copy bandwidth", f"{d['host_copy_bandwidth_gbps']:.1f} GB/s (measured)"),
    ]
    if "device" in d:
        rows += _human_device(d["device"])
    return table(rows)


def _human_device(v: dict) -> list[tuple[str, str]]:
    e = v["estimate"]
    rows = [
        (f"on {v['name']}", ("fits" if v["fits"] else "does NOT fit") +
         f": needs {format_size(v['needed_bytes'])} (peak + OS headroom) of {format_size(v['ram_bytes'])}"),
    ]
    if "largest_budget_bytes" in v:
        rows.append(("  largest budget", f"{format_size(v['largest_budget_bytes'])} "
                                         f"({v['largest_budget_slots']} slots, full memory)"))
    tps = "-" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:.1f} tokens/s"
    rows.append(("  estimate", f"ttft {e['ttft_ms']:.0f} ms, {tps} (bandwidth ratio {e['bandwidth_ratio']:.2f}; "
                               f"an estimate, see --json caveats)"))
    return rows


def _plot(report: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib (a host extra): pip install 'edgekv[host]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekv.devices.profiler import PARTS

    fig, ax = plt.subplots(figsize=(7, 5))
    bottom = 0.0
    for part in PARTS:
        mib = report["breakdown_bytes"][part] / 2**20
        ax.bar(["peak RSS"], [mib], bottom=[bottom], width=0.5, label=part.replace("_", " "))
        bottom += mib
    dev = report.get("device")
    if dev:
        available = dev["available_bytes"] / 2**20
        label = f"{dev['name']}: RAM - OS headroom ({available:.0f} MiB)"
        if available <= 3 * bottom:
            ax.axhline(available, color="k", ls="--", label=label)
        else:  # a line far above would squash the bar
            ax.set_xlabel(f"{label}: off scale")
    ax.set_ylabel("MiB")
    ax.set_title(f"edgekv runtime footprint: peak {bottom:.0f} MiB (measured on {report['host']['machine']})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _budget_mode(model: str, budget: str, pooled_len: int, payload: str, k: int, device: str | None,
                 json_out: bool) -> None:
    cfg = BudgetConfig(pooled_len=pooled_len, payload_dtype=payload, top_k=k)
    shape = model_shape(model)
    report = budget_report(shape, parse_size(budget), cfg)
    if report["num_slots"] < 1:  # the same refusal `edgekv adapt` gives when creating the memory
        raise BudgetError(f"budget {report['budget_bytes']} B is too small for one slot: a slot needs "
                          f"{report['overhead_bytes'] + report['table_bytes_per_slot'] + report['slot_bytes']} B "
                          f"with the header (lower --pooled-len{denser_hint(payload, '--payload int4')}, or raise the budget)")
    if device:
        from edgekv.devices.profiler import budget_device_verdict
        from edgekv.devices.profiles import load_profile

        report["device"] = budget_device_verdict(shape, report, load_profile(device))
    emit(report, json_out, _human)


@command("profile")
def profile_cmd(
    artifacts: str = typer.Argument(None, help="Folder written by `edgekv export`: measure it on this host."),
    memory: str = typer.Option(None, "--memory", help="Memory file (.ekv) to retrieve from."),
    device: str = typer.Option(None, "--device", help="Board profile name (e.g. rpi4-4gb) or a profile JSON file."),
    model: str = typer.Option(None, "--model", "-m", help="Budget arithmetic: HF model folder, config.json, or built-in name."),
    budget: str = typer.Option(None, "--budget", help="Budget arithmetic: memory budget, bytes, 16MB or 16MiB."),
    pooled_len: int = field_option(BudgetConfig, "pooled_len", "--pooled-len"),
    payload: str = field_option(BudgetConfig, "payload_dtype", "--payload"),
    k: int | None = field_option(ProfileConfig, "k", "-k", "--entries"),
    threads: int = field_option(ProfileConfig, "threads", "--threads", "-t"),
    context: int = field_option(ProfileConfig, "context", "--context"),
    plot: str = typer.Option(None, "--plot", help="Write a stacked bar of the breakdown (PNG/SVG/PDF)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure ARTIFACTS' peak memory and speed on this host (and judge a --device), or do
    the budget arithmetic for --model and --budget."""
    if artifacts is None:
        if model is None or budget is None:
            raise InputError("pass ARTIFACTS to measure an export, or --model and --budget for the arithmetic")
        if plot:
            raise InputError("--plot needs ARTIFACTS: it draws the measured breakdown")
        _budget_mode(model, budget, pooled_len, payload, DEFAULT_TOP_K if k is None else k, device, json_out)
        return
    if model is not None or budget is not None:
        raise InputError("--model/--budget are for the arithmetic without ARTIFACTS; pass one or the other")
    from edgekv.devices.profiler import profile_artifacts
    from edgekv.devices.profiles import load_profile

    profile = load_profile(device) if device else None
    config = ProfileConfig(k=k, threads=threads, context=context)
    report = profile_artifacts(artifacts, memory, config, profile, progress=not json_out)
    if plot:
        _plot(report, plot)
    emit(report, json_out, _human_measured)
