"""``edgekv run ARTIFACTS``: generate on the device runtime, with retrieved memory injected."""

from __future__ import annotations

import sys

import typer

from edgekv.cli import command, emit, field_option
from edgekv.runtime.runtime import RuntimeConfig
from edgekv.runtime.sampling import SamplingConfig


@command("run")
def run_cmd(
    artifacts: str = typer.Argument(..., help="Folder written by `edgekv export`."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user prompt ('-' reads stdin)."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt (a conversation of a system and a "
                                                            "user turn; retrieval keys on the prompt)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable): the answer ends before it."),
    memory: str = typer.Option(None, "--memory", help="Memory file (.ekv) to retrieve from."),
    k: int = field_option(RuntimeConfig, "k", "-k", "--entries"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = field_option(SamplingConfig, "temperature", "--temperature"),
    top_p: float = field_option(SamplingConfig, "top_p", "--top-p"),
    seed: int = field_option(SamplingConfig, "seed", "--seed"),
    top_k: int = field_option(SamplingConfig, "top_k", "--top-k"),
    min_p: float = field_option(SamplingConfig, "min_p", "--min-p"),
    repetition_penalty: float = field_option(SamplingConfig, "repetition_penalty", "--repeat-penalty"),
    threads: int = field_option(RuntimeConfig, "threads", "--threads", "-t"),
    retrieval: str = field_option(RuntimeConfig, "retrieval", "--retrieval"),
    chat: bool = field_option(RuntimeConfig, "chat", "--chat/--no-chat"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    image: str = typer.Option(None, "--image", help="Image file for vision-language artifacts."),
    trust: str = typer.Option(None, "--trust", envvar="EDGEKV_TRUST",
                              help="Public key file (.pub of `edgekv keys generate`): refuse artifacts and a memory "
                                   "that this key did not sign (manifest.json.sig, MEM.ekv.sig)."),
) -> None:
    """Generate text for a prompt; streams as it goes (or JSON with --json)."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.runtime import GenerationResult

    if prompt == "-":
        prompt = sys.stdin.read()
    with Runtime.load(artifacts, memory=memory, k=k, threads=threads, retrieval=retrieval,
                      chat=chat, trust=trust) as rt:
        res = GenerationResult()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}] if system else None
        pieces = rt.stream(prompt, max_new_tokens, temperature, top_p, seed, result=res, image=image,
                           messages=messages, stop=stop or (), top_k=top_k, min_p=min_p,
                           repetition_penalty=repetition_penalty)
        if json_out:
            for _ in pieces:
                pass
            data = res.to_dict()
            data["retrieval_mode"] = rt.retriever.mode if rt.retriever else None
            data["retrieval_reason"] = rt.retriever.reason if rt.retriever else None  # which index, or why exact
            data["trusted_key_id"] = rt.trusted_key_id
            emit(data, True, str)
            return
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if res.retrieved:
            used = ", ".join(f"{r.entry_id}:{r.alpha:.2f}" for r in reversed(res.retrieved))
            typer.echo(f"[memory: {len(res.retrieved)} entries (id:alpha) {used}; {rt.retriever.mode} search; "
                       f"ttft {res.ttft_ms:.0f} ms; {res.tokens_per_s:.1f} tok/s]", err=True)
