"""``edgekv chat`` on a pseudo-terminal, as a person uses it: each answer is the runtime's
answer to the whole conversation so far (retrieval on the last user turn), the commands work,
Ctrl-D ends with exit 0; ``edgekv run --system`` and ``--stop``."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from test_mismatch import memory_for
from typer.testing import CliRunner

from edgekv.cli import app

pexpect = pytest.importorskip("pexpect")
EXE = os.path.join(os.path.dirname(sys.executable), "edgekv")


@pytest.fixture(scope="module")
def art_mem(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    art = str(tmp / "art")
    shutil.copytree(exported("llama"), art)
    return art, memory_for(art, str(tmp / "m.ekv"), n=8, top_k=2)


def _answer(child) -> str:
    """The text printed after the echoed line, up to the next prompt."""
    child.expect("\r\n> ", timeout=60)
    return child.before.replace("\r\n", "\n")


def test_chat_session_on_a_terminal(art_mem):
    from edgekv.runtime import Runtime

    art, mem = art_mem
    system = "You answer in one word."
    child = pexpect.spawn(EXE, ["chat", art, "--memory", mem, "-s", system, "-n", "6", "--threads", "1",
                                "--show-memory"], encoding="utf-8", timeout=60, env={**os.environ, "COLUMNS": "200"})
    try:
        child.expect("edgekv chat \\(memory .*k = 2\\)")
        child.expect("> ")
        with Runtime.load(art, memory=mem, threads=1) as rt:
            convo = [{"role": "system", "content": system}]
            for turn in ("code for river?", "and for apple?"):
                child.sendline(turn)
                child.expect_exact(turn + "\r\n")  # the terminal echoes the line
                got = _answer(child)
                convo.append({"role": "user", "content": turn})
                ref = rt.chat(convo, 6)
                assert got.startswith(ref.text + "\n"), (got, ref.text)
                assert "[memory: t/s" in got  # --show-memory: task/source:alpha of each entry
                convo.append({"role": "assistant", "content": ref.text})
            # the second answer saw the first turn: it is the answer to the whole conversation
            assert rt.chat(convo[:1] + convo[3:4], 6).num_prompt_tokens < rt.chat(convo[:4], 6).num_prompt_tokens
            child.sendline("/memory off")
            child.expect_exact("(memory off)")
            child.sendline("code for river?")
            child.expect_exact("code for river?\r\n")
            got = _answer(child)
            convo.append({"role": "user", "content": "code for river?"})
            want = rt.chat(convo, 6, use_memory=False).text
            assert got == want, (got, want)
            assert "[memory:" not in got
        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")
        child.sendline("/frobnicate")
        child.expect("unknown command /frobnicate")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_exit_command_and_no_memory(exported):
    child = pexpect.spawn(EXE, ["chat", exported("llama"), "-n", "3", "--threads", "1"], encoding="utf-8", timeout=60)
    try:
        child.expect("edgekv chat \\(no memory\\)")
        child.expect("> ")
        child.sendline("/memory on")
        child.expect_exact("on needs --memory")
        child.sendline("hello")
        child.expect_exact("hello\r\n")
        _answer(child)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_run_system_prompt_and_stop(art_mem):
    from edgekv.runtime import Runtime

    art, mem = art_mem
    runner = CliRunner()
    res = runner.invoke(app, ["run", art, "--memory", mem, "-p", "code for river?", "-s", "Be brief.", "-n", "8",
                              "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    with Runtime.load(art, memory=mem) as rt:
        ref = rt.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "code for river?"}], 8)
        plain = rt.generate("code for river?", 8)
    assert got["text"] == ref.text and got["num_prompt_tokens"] == ref.num_prompt_tokens > plain.num_prompt_tokens
    assert [r["slot"] for r in got["retrieved"]] == [r.slot for r in plain.retrieved]  # keyed on the prompt
    if len(plain.text) >= 4:
        stop = plain.text[2:4]
        res = runner.invoke(app, ["run", art, "--memory", mem, "-p", "code for river?", "-n", "8", "--stop", stop,
                                  "--json"])
        out = json.loads(res.stdout)
        assert out["text"] == plain.text[:plain.text.find(stop)] and out["stop_reason"] == "stop"
