"""``edgekv chat ARTIFACTS``: an interactive conversation on the device runtime, the memory
retrieved afresh for every user turn."""

from __future__ import annotations

import sys

import typer

from edgekv.cli import command, field_option
from edgekv.errors import InputError
from edgekv.runtime.runtime import RuntimeConfig
from edgekv.runtime.sampling import SamplingConfig

HELP = "commands: /reset (forget the conversation), /memory on|off, /exit (or Ctrl-D)"


def trim_to_fit(rt, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """Drop the oldest user/assistant pairs (the system turn stays) until the conversation,
    the memory tokens and ``max_new_tokens`` fit the model's context. -> the kept messages"""
    if not rt.max_positions:
        return messages
    memory = rt.config.k * rt.memory.spec.pooled_len if rt.memory is not None else 0
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head):]
    while len(turns) > 1 and len(rt.conversation_ids(head + turns)[1]) + memory + max_new_tokens > rt.max_positions:
        turns = turns[2:]  # one user turn and its answer
    return head + turns


@command("chat")
def chat_cmd(
    artifacts: str = typer.Argument(..., help="Folder written by `edgekv export`."),
    memory: str = typer.Option(None, "--memory", help="Memory file (.ekv) to retrieve from."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt for the conversation."),
    k: int = field_option(RuntimeConfig, "k", "-k", "--entries"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens per answer."),
    temperature: float = field_option(SamplingConfig, "temperature", "--temperature"),
    top_p: float = field_option(SamplingConfig, "top_p", "--top-p"),
    seed: int = field_option(SamplingConfig, "seed", "--seed"),
    top_k: int = field_option(SamplingConfig, "top_k", "--top-k"),
    min_p: float = field_option(SamplingConfig, "min_p", "--min-p"),
    repetition_penalty: float = field_option(SamplingConfig, "repetition_penalty", "--repeat-penalty"),
    threads: int = field_option(RuntimeConfig, "threads", "--threads", "-t"),
    retrieval: str = field_option(RuntimeConfig, "retrieval", "--retrieval"),
    show_memory: bool = typer.Option(False, "--show-memory", help="After each answer, list the entries retrieved."),
    trust: str = typer.Option(None, "--trust", envvar="EDGEKV_TRUST",
                              help="Public key file: refuse artifacts and a memory that this key did not sign."),
) -> None:
    """Talk with the model; every user turn retrieves from the memory. Ctrl-D or /exit ends."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.runtime import GenerationResult

    with Runtime.load(artifacts, memory=memory, k=k, threads=threads, retrieval=retrieval, trust=trust) as rt:
        if not rt.tokenizer.chat_template:
            raise InputError(f"{artifacts}: the model has no chat template; use `edgekv run` for plain prompts")
        head = [{"role": "system", "content": system}] if system else []
        history: list[dict] = []
        use_memory = rt.memory is not None
        what = f"memory {memory}, k = {rt.config.k}" if use_memory else "no memory"
        typer.echo(f"edgekv chat ({what}); {HELP}", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                typer.echo("", err=True)
                return
            except KeyboardInterrupt:
                typer.echo("", err=True)
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                history = []
                typer.echo("(conversation forgotten)", err=True)
                continue
            if text.startswith("/memory"):
                arg = text.split()[1:] or [""]
                if arg[0] not in ("on", "off") or (arg[0] == "on" and rt.memory is None):
                    typer.echo("usage: /memory on|off (on needs --memory)", err=True)
                    continue
                use_memory = arg[0] == "on"
                typer.echo(f"(memory {arg[0]})", err=True)
                continue
            if text.startswith("/"):
                typer.echo(f"unknown command {text.split()[0]}; {HELP}", err=True)
                continue
            messages = trim_to_fit(rt, head + history + [{"role": "user", "content": line}], max_new_tokens)
            res = GenerationResult()
            try:
                for piece in rt.stream("", max_new_tokens, temperature, top_p, seed, use_memory, res,
                                       messages=messages, top_k=top_k, min_p=min_p,
                                       repetition_penalty=repetition_penalty):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except InputError as e:  # this turn alone is too long: say so, keep the conversation
                typer.echo(f"edgekv: error: {e}", err=True)
                continue
            except KeyboardInterrupt:  # stop this answer, keep what was said
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")
            sys.stdout.flush()
            history = messages[len(head):] + [{"role": "assistant", "content": res.text}]
            if show_memory and res.retrieved:
                used = ", ".join(f"{r.task}/{r.source_id}:{r.alpha:.2f}" for r in reversed(res.retrieved))
                typer.echo(f"[memory: {used}]", err=True)
