"""Tokenizer on the device: ``tokenizers`` + the chat template rendered in a Jinja sandbox.

Reproduces what Hugging Face's tokenizer does for the two calls edgekv makes:
``tokenizer(text)`` (post-processor specials included) and
``apply_chat_template(messages, add_generation_prompt=True)`` (template text encoded
without adding specials). The template comes from ``manifest.json``; it is compiled once
at load and rendered in an immutable sandbox, so a hostile template cannot reach Python
(attributes such as ``__class__`` or ``__globals__`` are refused). The sandbox also bounds
what a template can build (``**``, ``*``, ``+`` and ``%`` results, the rendered length) and
how long it runs (checked at every call, attribute and item access). Whatever goes wrong
comes out as an edgekv error: a broken template is a :class:`CorruptFileError`, a
conversation the template refuses (``raise_exception``) an :class:`InputError`.

The turn the runtime renders for every prompt (one user message + the generation prompt)
is pre-rendered at export (``chat_turn``: the text before and after the message, checked
there with probe messages, and the sha256 of the template it came from). While the
manifest's template still has that hash, such a turn is a concatenation and Jinja is never
imported (~2 MB of peak resident memory); any other conversation, or an edited
template, is rendered by the sandbox as before.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

from edgekv.errors import CorruptFileError, EdgeKVError, InputError
from edgekv.manifest import bounded_file

MAX_TOKENIZER_BYTES = 256 << 20  # the largest real tokenizer.json files are ~35 MB
MAX_TEMPLATE_CHARS = 1 << 20  # longest string (and rendered prompt) a template may build
MAX_TEMPLATE_SECONDS = 2.0  # a chat template renders in well under a millisecond


def _raise_exception(message: str) -> None:
    raise InputError(f"chat template refused the conversation: {message}")


def _fatal(e: BaseException) -> bool:
    """Exceptions that must pass through. (``tokenizers`` can raise pyo3's PanicException,
    a BaseException, on hostile files: that one is converted.)"""
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, EdgeKVError))


class _TemplateLimit(Exception):
    pass


def _sandbox():
    """An immutable Jinja sandbox with size and time limits (built lazily: jinja2 import)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])
        local = threading.local()  # the render's deadline, per thread (one Runtime serves many)

        def _tick(self) -> None:
            if time.monotonic() > getattr(self.local, "deadline", float("inf")):
                raise _TemplateLimit(f"rendering took longer than {MAX_TEMPLATE_SECONDS} s")

        def call_binop(self, context, operator, left, right):
            self._tick()
            if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right > 0 and right * max(left.bit_length(), 1) > 4096:
                raise _TemplateLimit("a power too large")
            if operator == "*" and isinstance(right, (str, list, tuple)) and isinstance(left, int):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                    and len(left) * right > MAX_TEMPLATE_CHARS:
                raise _TemplateLimit("a repeated string or list too long")
            if operator == "+" and isinstance(left, (str, list, tuple)) and hasattr(right, "__len__") \
                    and len(left) + len(right) > MAX_TEMPLATE_CHARS:
                raise _TemplateLimit("a concatenation too long")
            result = super().call_binop(context, operator, left, right)
            if isinstance(result, str) and len(result) > MAX_TEMPLATE_CHARS:
                raise _TemplateLimit("a string too long")
            return result

        def call(self, *args, **kwargs):
            self._tick()
            return super().call(*args, **kwargs)

        def getattr(self, obj, attribute):
            self._tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self._tick()
            return super().getitem(obj, argument)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


@dataclass
class DeviceTokenizer:
    tok: object  # tokenizers.Tokenizer
    chat_template: str | None
    special: dict  # bos_token / eos_token strings for templates
    chat_turn: tuple[str, str] | None = None  # (prefix, suffix) of one user turn, valid for chat_template
    _compiled: object = field(default=None, repr=False)  # (template source, jinja2 Template)

    @staticmethod
    def load(path: str, chat_template: str | None, special: dict | None = None,
             chat_turn: dict | None = None) -> DeviceTokenizer:
        """``chat_turn``: the manifest's pre-rendered user turn ({"prefix", "suffix", "template_sha256"});
        used only while it belongs to ``chat_template`` (then the template is compiled on first use)."""
        from tokenizers import Tokenizer

        bounded_file(path, MAX_TOKENIZER_BYTES, "a tokenizer.json",
                     "tokenizer file missing from the artifacts; re-export the model")
        try:
            tok = Tokenizer.from_file(path)
        except BaseException as e:  # tokenizers raises plain Exception on bad JSON, a panic on worse
            if _fatal(e):
                raise
            raise CorruptFileError(f"{path}: not a valid tokenizer.json ({str(e)[:200]})") from None
        turn = None
        if chat_template and chat_turn and chat_turn.get("template_sha256") == template_sha256(chat_template):
            turn = (str(chat_turn["prefix"]), str(chat_turn["suffix"]))
        out = DeviceTokenizer(tok, chat_template, dict(special or {}), turn)
        if chat_template and turn is None:
            out._template()  # a template that does not compile is refused at load, not per prompt
        return out

    def _template(self):
        if self._compiled is None or self._compiled[0] != self.chat_template:
            from jinja2 import TemplateError

            env = _sandbox()
            try:
                self._compiled = (self.chat_template, env.from_string(self.chat_template))
            except (TemplateError, RecursionError, MemoryError, ValueError) as e:
                raise CorruptFileError(f"the chat template in manifest.json does not compile ({str(e)[:200]}); "
                                       f"re-export the model") from None
        return self._compiled[1]

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:
            if _fatal(e):
                raise
            raise CorruptFileError(f"tokenizer.json cannot {what} this text ({str(e)[:200]}); "
                                   f"re-export the model") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call("encode", lambda: self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self._call("decode", lambda: self.tok.decode(list(ids), skip_special_tokens=True))

    def text_stream(self) -> TextStream:
        """A :class:`TextStream`: the text of generated ids, one token at a time."""
        return TextStream(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InputError("this model has no chat template; call with chat=False")
        if (self.chat_turn is not None and add_generation_prompt and len(messages) == 1
                and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str)
                and len(messages[0]) == 2):
            return self.chat_turn[0] + messages[0]["content"] + self.chat_turn[1]
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        template = self._template()
        template.environment.local.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        try:
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.special.get("bos_token") or "",
                                   eos_token=self.special.get("eos_token") or "")
        except EdgeKVError:
            raise
        except SecurityError as e:
            raise CorruptFileError(f"the chat template in manifest.json tried to reach Python internals and was "
                                   f"stopped ({str(e)[:200]}); use artifacts from a source you trust") from None
        except (TemplateError, _TemplateLimit, ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
                RecursionError, MemoryError) as e:
            raise CorruptFileError(f"the chat template in manifest.json failed ({type(e).__name__}: "
                                   f"{str(e)[:200]}); re-export the model") from None
        if len(text) > MAX_TEMPLATE_CHARS:
            raise CorruptFileError(f"the chat template in manifest.json rendered {len(text)} characters; "
                                   f"re-export the model")
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _decode_stream():
    """``tokenizers.decoders.DecodeStream`` skipping special tokens (tokenizers >= 0.21), or None."""
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=True)
    except (ImportError, TypeError):  # an older tokenizers, or a constructor that changed
        return None


class TextStream:
    """The text of a growing list of token ids: :meth:`push` adds one id and returns the text it
    completes ("" while a character is still incomplete: byte-level tokens can split one).

    Each push decodes a few ids with ``tokenizers``' ``DecodeStream`` (O(1) per token). Without it
    (tokenizers < 0.21), or once it fails on a tokenizer's decoder, every push decodes all the ids.
    The pieces concatenate to ``text``, the whole characters of ``decode(ids)``.
    """

    def __init__(self, tokenizer: DeviceTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._stream = _decode_stream()

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._step(token) if self._stream is not None else None
        if piece is None:  # no DecodeStream: the whole text, its new end once it is whole characters
            text = self.tokenizer.decode(self.ids)
            piece = "" if text.endswith("\ufffd") else text[len(self.text):]
        self.text += piece
        return piece

    def _step(self, token: int) -> str | None:
        """DecodeStream's piece ("" until whole characters), or None when it fails (then it is dropped)."""
        try:
            return self._stream.step(self.tokenizer.tok, token) or ""
        except BaseException as e:  # a decoder whose text of a window is not a prefix of the next one
            if _fatal(e):
                raise
            self._stream = None
            return None


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


CHAT_TURN_PROBES = ("PROBE-edgekv-7f3a", "  two lines\nwith {{ braces }} and spaces  ", "")


def chat_turn_of(tokenizer: DeviceTokenizer) -> dict | None:
    """The pre-rendered user turn for the manifest, or None when the template does not render
    every probe message as prefix + message + suffix (then the device keeps rendering it)."""
    if not tokenizer.chat_template:
        return None
    try:
        first = tokenizer.render_chat([{"role": "user", "content": CHAT_TURN_PROBES[0]}])
    except EdgeKVError:
        return None
    if first.count(CHAT_TURN_PROBES[0]) != 1:
        return None
    prefix, suffix = first.split(CHAT_TURN_PROBES[0])
    for probe in CHAT_TURN_PROBES[1:]:
        try:
            if tokenizer.render_chat([{"role": "user", "content": probe}]) != prefix + probe + suffix:
                return None
        except EdgeKVError:
            return None
    return {"prefix": prefix, "suffix": suffix, "template_sha256": template_sha256(tokenizer.chat_template)}
