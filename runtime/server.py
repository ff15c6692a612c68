"""``edgekv serve``: an OpenAI-compatible HTTP server over one loaded :class:`Runtime`.

Endpoints (the subset of the OpenAI API that ``llama-server`` users call):

* ``GET /v1/models`` -- the one model served;
* ``POST /v1/chat/completions`` -- ``messages`` (system / user / assistant, text), with
  ``stream`` (server-sent events), ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop`` (and llama-server's ``top_k``, ``min_p``,
  ``repetition_penalty``); retrieval keys on the last user message;
* ``POST /v1/completions`` -- ``prompt`` as it is (no chat template), the same options;
* ``GET /health``.

Every answer carries an ``edgekv`` field beside the OpenAI ones: the retrieved memory
entries (slot, entry id, task, source example, similarity, alpha), the memory tokens
injected and the time to first token, as ``llama-server`` adds its own timings.

Why the standard library's ``http.server`` (``ThreadingHTTPServer``): the device install
stays numpy + onnxruntime + hnswlib + tokenizers, nothing more; a board serves one model
to a handful of local clients, where a thread per connection is enough, and the runtime is
safe to share between threads (``tests/test_concurrency.py``). Bounds: a request body of at
most ``ServeConfig.max_request_bytes`` (413 beyond), ``max_tokens`` of at most
``ServeConfig.max_tokens_limit`` (400 beyond), a socket timeout for slow clients, and at
most ``ServeConfig.max_concurrent`` generations at once (others wait their turn).
Bad requests get a 4xx with an OpenAI-style ``{"error": {"message": ...}}`` body.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edgekv.configs import Config, knob
from edgekv.errors import EdgeKVError, InputError
from edgekv.runtime.runtime import GenerationResult, Runtime, check_stop


@dataclass(frozen=True)
class ServeConfig(Config):
    """How ``edgekv serve`` listens and what it accepts."""

    host: str = knob("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = knob(8080, "TCP port (0: any free port).")
    model_name: str | None = knob(None, "Model id the API reports (default: the artifacts folder's name).")
    max_request_bytes: int = 1 << 20  # largest request body accepted (413 beyond)
    max_tokens_limit: int = knob(1024, "Largest max_tokens a request may ask for.")
    default_max_tokens: int = knob(128, "max_tokens when a request gives none.")
    max_concurrent: int = knob(4, "Generations that run at once; further requests wait.")
    socket_timeout_s: float = 30.0  # a client that stalls mid-request is dropped

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InputError(f"ServeConfig.port must be in [0, 65535], got {self.port}")
        for name in ("max_request_bytes", "max_tokens_limit", "default_max_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise InputError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise InputError(f"ServeConfig.default_max_tokens ({self.default_max_tokens}) must be <= "
                             f"max_tokens_limit ({self.max_tokens_limit})")


DRAIN_LIMIT = 8  # an oversized body up to 8x the limit is read and dropped; a larger one is not read


class HTTPError(Exception):
    """A request refused with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class Request:
    """One generation request, validated."""

    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    messages: list | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    use_memory: bool
    top_k: int = 0  # sampling controls llama-server also takes
    min_p: float = 0.0
    repetition_penalty: float = 1.0


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise HTTPError(400, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}"[:300])
    return value


def parse_request(body: dict, chat: bool, cfg: ServeConfig) -> Request:
    """The JSON body of a completion request -> :class:`Request`; :class:`HTTPError` 400 names the field."""
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise HTTPError(400, f"messages[{i}].content: only text parts are supported")
                messages[i] = {**m, "content": "".join(p["text"] for p in content)}
        prompt = None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPError(400, "'prompt' must be a non-empty string")
        messages = None
    if body.get("n", 1) != 1:
        raise HTTPError(400, "'n' must be 1 (one choice per request)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", cfg.default_max_tokens, 1,
                         cfg.max_tokens_limit, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"'stream' must be true or false, got {stream!r}"[:300])
    use_memory = body.get("use_memory", True)  # edgekv's own: answer without the memory
    if not isinstance(use_memory, bool):
        raise HTTPError(400, f"'use_memory' must be true or false, got {use_memory!r}"[:300])
    try:
        stop = check_stop(body.get("stop"))
    except InputError as e:
        raise HTTPError(400, f"'stop': {e}") from None
    return Request(chat, messages, prompt, max_tokens, float(_number(body, "temperature", 0.0, 0.0, 2.0)),
                   float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
                   _number(body, "seed", None, 0, 2 ** 63 - 1, integer=True), stop, stream, use_memory,
                   _number(body, "top_k", 0, 0, 1 << 20, integer=True), float(_number(body, "min_p", 0.0, 0.0, 0.999)),
                   float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0)))


def _finish_reason(res: GenerationResult) -> str:
    return "length" if res.stop_reason == "length" else "stop"


def edgekv_field(res: GenerationResult) -> dict:
    """What the memory did for this answer: the retrieved entries (best last), tokens, timings."""
    return {"retrieved": [{"slot": r.slot, "entry_id": r.entry_id, "task": r.task, "source_id": r.source_id,
                           "similarity": round(float(r.sim), 6), "alpha": round(float(r.alpha), 6)}
                          for r in res.retrieved],
            "memory_tokens": res.num_memory_tokens, "ttft_ms": round(res.ttft_ms, 3),
            "tokens_per_s": round(res.tokens_per_s, 3), "stop_reason": res.stop_reason}


def _usage(res: GenerationResult) -> dict:
    return {"prompt_tokens": res.num_prompt_tokens, "completion_tokens": len(res.token_ids),
            "total_tokens": res.num_prompt_tokens + len(res.token_ids)}


class Service:
    """The server's state: the runtime, the model id and the admission gate."""

    def __init__(self, runtime: Runtime, cfg: ServeConfig):
        self.runtime, self.cfg = runtime, cfg
        self.model = cfg.model_name or os.path.basename(os.path.normpath(runtime.artifacts))
        self.created = int(time.time())
        self.gate = threading.BoundedSemaphore(cfg.max_concurrent)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "edgekv"}]}

    def pieces(self, req: Request, res: GenerationResult) -> Iterator[str]:
        """The answer's text pieces (the runtime's stream), one generation at a time per gate slot."""
        with self.gate:
            yield from self.runtime.stream(req.prompt or "", req.max_tokens, req.temperature, req.top_p, req.seed,
                                           req.use_memory, res, messages=req.messages, raw=not req.chat,
                                           stop=req.stop, top_k=req.top_k, min_p=req.min_p,
                                           repetition_penalty=req.repetition_penalty)

    def complete(self, req: Request) -> dict:
        res = GenerationResult()
        for _ in self.pieces(req, res):
            pass
        rid, choice = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", {"index": 0,
                                                                                   "finish_reason": _finish_reason(res)}
        if req.chat:
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice.update(text=res.text, logprobs=None)
        return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice], "usage": _usage(res),
                "edgekv": edgekv_field(res)}

    def chunks(self, req: Request) -> Iterator[dict]:
        """Streamed chunks: (chat: the role first) each text piece, then the finish reason with
        usage and the edgekv field."""
        res = GenerationResult()
        rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        created = int(time.time())

        def chunk(delta: str | None, finish: str | None = None, role: bool = False, **extra) -> dict:
            if req.chat:
                d = {"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice], **extra}

        pieces = self.pieces(req, res)
        first = next(pieces, None)  # the runtime's refusals (prompt too long, ...) come before any chunk
        if req.chat:
            yield chunk(None, role=True)
        for piece in itertools.chain(() if first is None else (first,), pieces):
            yield chunk(piece)
        yield chunk(None, _finish_reason(res), usage=_usage(res), edgekv=edgekv_field(res))


def make_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``service`` (one instance per request, as http.server does)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
        server_version = "edgekv"
        timeout = service.cfg.socket_timeout_s

        def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
            pass  # quiet; the CLI prints one line at start

        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: HTTPError) -> None:
            self._send_json(e.status, {"error": {"message": e.message, "type": e.kind, "param": None, "code": None}})

        def _body(self) -> dict:
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
                self.close_connection = True
                raise HTTPError(411, "send the body with a Content-Length header")
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                raise HTTPError(400, f"bad Content-Length {length!r}"[:200]) from None
            if n > service.cfg.max_request_bytes or n < 0:
                self.close_connection = True
                if 0 < n <= DRAIN_LIMIT * service.cfg.max_request_bytes:  # read it away, so the client sees the 413
                    while n > 0:
                        got = self.rfile.read(min(n, 1 << 16))
                        if not got:  # the client stopped sending
                            break
                        n -= len(got)
                raise HTTPError(413, f"request body of {n} bytes exceeds the limit of "
                                     f"{service.cfg.max_request_bytes} bytes")
            raw = self.rfile.read(n)
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise HTTPError(400, f"the request body is not JSON: {str(e)[:120]}") from None

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                self._send_json(200, service.models())
            elif path == "/health":
                self._send_json(200, {"status": "ok"})
            elif path in ("/v1/chat/completions", "/v1/completions"):
                self._error(HTTPError(405, f"{path} takes POST"))
            else:
                self._error(HTTPError(404, f"no endpoint {path!r}; see /v1/models, /v1/chat/completions, "
                                           f"/v1/completions"[:300], "not_found_error"))

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path not in ("/v1/chat/completions", "/v1/completions"):
                    code = 405 if path in ("/v1/models", "/health") else 404
                    self.close_connection = True
                    raise HTTPError(code, f"no POST endpoint {path!r}"[:300], "not_found_error")
                req = parse_request(self._body(), path == "/v1/chat/completions", service.cfg)
                if req.stream:
                    self._stream(service.chunks(req))
                else:
                    self._send_json(200, service.complete(req))
            except HTTPError as e:
                self._error(e)
            except InputError as e:  # the runtime refused the input (too long, bad messages)
                self._error(HTTPError(400, str(e)))
            except EdgeKVError as e:
                self._error(HTTPError(500, str(e), "server_error"))
            except Exception as e:  # a bug, not the client's fault: say so, keep serving
                print(f"edgekv serve: internal error on {path}: {type(e).__name__}: {e}", file=sys.stderr)
                self.close_connection = True
                self._error(HTTPError(500, f"internal error ({type(e).__name__})", "server_error"))

        def _stream(self, chunks: Iterator[dict]) -> None:
            """Server-sent events over chunked transfer encoding; the first chunk is computed
            before the headers go out, so a refused input is still a 4xx."""
            first = next(chunks)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write(data: bytes) -> None:
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                try:
                    for item in itertools.chain((first,), chunks):
                        write(b"data: " + json.dumps(item).encode("utf-8") + b"\n\n")
                    write(b"data: [DONE]\n\n")
                except EdgeKVError as e:  # headers are out: report in the stream, as OpenAI does
                    err = {"error": {"message": str(e), "type": "server_error"}}
                    write(b"data: " + json.dumps(err).encode("utf-8") + b"\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream
                self.close_connection = True
            finally:
                chunks.close()  # ends the generation and frees its gate slot

    return Handler


def make_server(runtime: Runtime, cfg: ServeConfig | None = None) -> ThreadingHTTPServer:
    """A server bound to ``cfg.host:cfg.port`` (not yet serving: call ``serve_forever``)."""
    cfg = cfg or ServeConfig()
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), make_handler(Service(runtime, cfg)))
    except OSError as e:
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; choose another --port "
                         f"or --host") from None
    server.daemon_threads = True
    return server
