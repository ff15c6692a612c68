"""One set of command-line conventions, checked on every command by walking the CLI:
the same name always has the same flags, a short flag never means two things, the model is
always ``-m/--model``, retrieved entries ``-k/--entries`` (``--top-k`` is sampling's),
threads ``-t``, outputs ``-o``, booleans are flags, long commands take ``--no-progress``."""

from __future__ import annotations

import typer.main

import edgekv.commands  # noqa: F401 - registers the commands
from edgekv.cli import app

# option name -> the exact flags it has wherever it appears
FLAGS = {
    "model": {"--model", "-m"},
    "memory": {"--memory"},
    "threads": {"--threads", "-t"},
    "out": {"--out", "-o"},
    "max_new_tokens": {"--max-new-tokens", "-n"},
    "prompt": {"--prompt", "-p"},
    "system": {"--system", "-s"},
    "k": {"-k", "--entries"},  # entries retrieved per query
    "json_out": {"--json"},
    "no_progress": {"--no-progress"},
    "seed": {"--seed"},
    "temperature": {"--temperature"},
    "top_p": {"--top-p"},
    "min_p": {"--min-p"},
    "trust": {"--trust"},
}
LONG_COMMANDS = {"adapt", "bench", "demo", "export"}  # the ones that show progress bars on a terminal


def commands() -> dict[str, object]:
    out = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*path, name))
        else:
            out[" ".join(path)] = cmd

    walk(typer.main.get_command(app), ())
    return out


def options(cmd) -> list:
    return [p for p in cmd.params if type(p).__name__.endswith("Option")]


def test_the_walk_sees_every_command():
    names = set(commands())
    assert {"adapt", "export", "run", "chat", "serve", "profile", "bench", "demo", "inspect", "memory ls",
            "memory rm", "memory diff", "memory apply", "keys generate", "stream write"} <= names


def test_same_name_same_flags_everywhere():
    bad = []
    for name, cmd in commands().items():
        for p in options(cmd):
            flags = set(p.opts + p.secondary_opts)
            want = FLAGS.get(p.name)
            if p.name == "top_k":  # adapt's entries per query vs sampling's top-k
                want = {"-k", "--entries"} if name == "adapt" else {"--top-k"}
            if want is not None and flags != want:
                bad.append(f"{name}: {p.name} has {sorted(flags)}, want {sorted(want)}")
    assert not bad, "\n".join(bad)


def test_a_short_flag_means_one_thing():
    seen: dict[str, set] = {}
    for cmd in commands().values():
        for p in options(cmd):
            for short in (o for o in p.opts if len(o) == 2):
                seen.setdefault(short, set()).add(p.name)
    clash = {s: n for s, n in seen.items() if len(n - {"top_k", "k"}) > 1 or (len(n) > 1 and s != "-k")}
    assert not clash, clash


def test_model_is_never_positional_and_memory_never_short():
    for name, cmd in commands().items():
        args = [p.name for p in cmd.params if type(p).__name__.endswith("Argument")]
        assert "model" not in args, f"{name}: the model is an option, -m/--model"
        for p in options(cmd):
            if "-m" in p.opts:
                assert p.name == "model", f"{name}: -m is {p.name}"


def test_threads_have_one_default():
    defaults = {name: p.default for name, cmd in commands().items() for p in options(cmd) if p.name == "threads"}
    assert len(defaults) >= 7 and set(defaults.values()) == {None}, defaults  # the library decides unless given


def test_booleans_are_flags_and_long_commands_can_be_quiet():
    for name, cmd in commands().items():
        for p in options(cmd):
            if isinstance(p.default, bool):
                assert p.is_flag, f"{name}: {p.name} must be a flag"
        if name in LONG_COMMANDS:
            assert "no_progress" in {p.name for p in options(cmd)}, f"{name} lacks --no-progress"
