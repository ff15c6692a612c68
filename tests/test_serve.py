"""``edgekv serve``: the OpenAI API on the device runtime, checked with the official ``openai``
client as a real client; conversations and stop strings in the runtime it serves.

Every answer is held to the runtime called directly (same text, token count and retrieved
entries); streaming gives the same text as one answer; bad requests are 4xx with an
OpenAI-style error and the server keeps serving; concurrent clients get what serial ones get.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_mismatch import memory_for

from edgekv.errors import InputError

PROMPTS = ["code for river?", "what colour is the triangle?", "how many dots are there?", "the quick brown fox"]


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """(runtime, base url) of a server on a free port, with a 12-entry memory."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.server import ServeConfig, make_server

    tmp = tmp_path_factory.mktemp("serve")
    art = str(tmp / "art")
    shutil.copytree(exported("llama"), art)
    mem = memory_for(art, str(tmp / "m.ekv"), n=12, top_k=3)
    rt = Runtime.load(art, memory=mem, threads=1)
    server = make_server(rt, ServeConfig(port=0, max_tokens_limit=64, default_max_tokens=8, max_concurrent=2))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield rt, f"http://{host}:{port}"
    server.shutdown()
    server.server_close()
    rt.close()


def client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body: bytes | None, headers: dict | None = None, method: str = "POST"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


def test_models_and_health(served):
    rt, url = served
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["art"]
    assert post(url, "/health", None, method="GET") == (200, {"status": "ok"})


def test_chat_completion_is_the_runtimes_answer(served):
    rt, url = served
    c = client(url)
    for prompt in PROMPTS:
        msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
        got = c.chat.completions.create(model="art", messages=msgs, max_tokens=8)
        ref = rt.chat(msgs, 8)
        assert got.choices[0].message.content == ref.text and got.choices[0].message.role == "assistant"
        assert got.usage.completion_tokens == len(ref.token_ids) and got.usage.prompt_tokens == ref.num_prompt_tokens
        assert got.choices[0].finish_reason == ("length" if ref.stop_reason == "length" else "stop")
        extra = got.model_extra["edgekv"]
        assert [(e["slot"], e["alpha"]) for e in extra["retrieved"]] == [(r.slot, round(r.alpha, 6))
                                                                        for r in ref.retrieved]
        assert len(extra["retrieved"]) == 3 and extra["memory_tokens"] == ref.num_memory_tokens > 0
        # the system turn is part of the prompt: the same user message alone is a shorter prompt
        assert rt.chat(msgs[1:], 8).num_prompt_tokens < ref.num_prompt_tokens


def test_completion_is_the_raw_prompt(served):
    rt, url = served
    got = client(url).completions.create(model="art", prompt="the quick brown fox", max_tokens=6, temperature=0)
    ref = rt.generate("the quick brown fox", 6, raw=True)
    assert got.choices[0].text == ref.text and got.usage.completion_tokens == len(ref.token_ids)
    assert ref.num_prompt_tokens < rt.generate("the quick brown fox", 6).num_prompt_tokens  # no chat template


def test_streaming_gives_the_same_text(served):
    rt, url = served
    c = client(url)
    for prompt in PROMPTS[:2]:
        msgs = [{"role": "user", "content": prompt}]
        chunks = list(c.chat.completions.create(model="art", messages=msgs, max_tokens=10, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        ref = rt.chat(msgs, 10)
        assert text == ref.text and len(chunks) >= 3
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert len(chunks[-1].model_extra["edgekv"]["retrieved"]) == 3
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    pieces = list(c.completions.create(model="art", prompt="hello world", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == rt.generate("hello world", 6, raw=True).text


def test_stop_strings_end_the_answer_before_them(served):
    rt, url = served
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    full = rt.chat(msgs, 16).text
    assert len(full) >= 6, full
    stop = full[3:5]  # two characters inside the answer: it must end right before their first occurrence
    want = full[:full.find(stop)]
    got = client(url).chat.completions.create(model="art", messages=msgs, max_tokens=16, stop=[stop])
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    # streamed: no piece ever holds part of the stop string, the text is the same
    res = __import__("edgekv.runtime.runtime", fromlist=["GenerationResult"]).GenerationResult()
    pieces = list(rt.stream("", 16, result=res, messages=msgs, stop=[stop, "never-seen"]))
    assert "".join(pieces) == res.text == want and res.stop_reason == "stop"
    assert all(stop not in p for p in pieces)
    assert rt.chat(msgs, 16, stop=["never-seen"]).text == full  # a stop string that does not occur changes nothing


@pytest.mark.parametrize("path, body, status, phrase", [
    ("/v1/chat/completions", b"{not json", 400, "not JSON"),
    ("/v1/chat/completions", b"[]", 400, "JSON object"),
    ("/v1/chat/completions", b"{}", 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}).encode(),
     400, "'max_tokens' must be an integer in [1, 64]"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400,
     "messages[0] must be"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "x"}]}).encode(), 400,
     "the last message must be the user's"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400, "only text parts"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400,
     "'n' must be 1"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}).encode(),
     400, "non-empty strings"),
    ("/v1/completions", json.dumps({"prompt": "  "}).encode(), 400, "'prompt' must be a non-empty string"),
    ("/v1/completions", json.dumps({"prompt": "x " * 5000}).encode(), 400, "exceeds the model's context"),
    ("/v1/embeddings", b"{}", 404, "no POST endpoint"),
    ("/v1/models", b"{}", 405, "no POST endpoint"),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(served, path, body, status, phrase):
    rt, url = served
    got, err = post(url, path, body)
    assert got == status and phrase in err["error"]["message"], err
    assert post(url, "/health", None, method="GET")[0] == 200


def test_stream_refusal_is_still_a_4xx(served):
    rt, url = served
    body = json.dumps({"messages": [{"role": "user", "content": "x " * 5000}], "stream": True}).encode()
    status, err = post(url, "/v1/chat/completions", body)
    assert status == 400 and "exceeds the model's context" in err["error"]["message"]


def test_body_limits(served):
    rt, url = served
    status, err = post(url, "/v1/chat/completions", b"x" * ((1 << 20) + 1))
    assert status == 413 and "exceeds the limit" in err["error"]["message"]
    status, err = post(url, "/v1/chat/completions", b"{}", headers={"Content-Length": str(1 << 30)})  # not read
    assert status == 413
    assert post(url, "/v1/chat/completions", None, method="GET")[0] == 405
    assert post(url, "/nowhere", None, method="GET")[0] == 404


def test_concurrent_clients_get_what_serial_calls_get(served):
    rt, url = served
    c = client(url)
    calls = [(p, t, s) for p in PROMPTS for t, s in ((0.0, None), (0.9, 7))] * 2

    def one(call):
        prompt, temperature, seed = call
        r = c.chat.completions.create(model="art", messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                      temperature=temperature, seed=seed)
        return r.choices[0].message.content, [e["slot"] for e in r.model_extra["edgekv"]["retrieved"]]

    serial = [one(call) for call in calls]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(one, calls))
    assert parallel == serial
    assert len({s[0] for s in serial}) > 2


def test_conversations_in_the_runtime(served):
    rt, _ = served
    one = rt.chat([{"role": "user", "content": "code for river?"}], 6)
    assert one.text == rt.generate("code for river?", 6).text  # one user turn is a plain prompt
    two = rt.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                   {"role": "user", "content": "code for river?"}], 6)
    assert two.num_prompt_tokens > one.num_prompt_tokens
    assert [r.slot for r in two.retrieved] == [r.slot for r in one.retrieved]  # retrieval keys on the last user turn
    for bad, phrase in (([], "non-empty list"), ([{"role": "user"}], "messages[0] must be"),
                        ([{"role": "user", "content": " "}], "last user message is empty")):
        with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
            rt.chat(bad, 4)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_cli_serves_until_interrupted(sig, exported, tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM stop it with exit 0, also when it was started with SIGINT ignored
    (as a background job or a test runner's worker starts it: Python then has no handler of its own)."""
    art = exported("llama")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "edgekv")
    proc = subprocess.Popen([exe, "serve", art, "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "no memory" in line, line
        url = line.split(" on ")[1].split("/v1")[0]
        status, body = post(url, "/v1/completions", json.dumps({"prompt": "hello", "max_tokens": 3}).encode())
        assert status == 200 and body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
        assert body["edgekv"]["retrieved"] == []
    finally:
        proc.send_signal(sig)
        proc.communicate(timeout=90)  # drains both pipes while it shuts down (a full pipe would block it)
    assert proc.returncode == 0


def test_cli_refuses_a_busy_port(exported):
    import socket

    from typer.testing import CliRunner

    from edgekv.cli import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", exported("llama"), "--port", str(port)])
    assert res.exit_code != 0 and "cannot listen on 127.0.0.1" in res.output
