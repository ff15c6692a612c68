"""Tokenizer on the device: ``tokenizers`` + the chat template rendered in a Jinja sandbox.

Reproduces what Hugging Face's tokenizer does for the two calls edgekv makes:
``tokenizer(text)`` (post-processor specials included) and
``apply_chat_template(messages, add_generation_prompt=True)`` (template text encoded
without adding specials). The template comes from ``manifest.json``; it is rendered in
an immutable sandbox, so a hostile template cannot reach Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgekv.errors import CorruptFileError, InputError


def _raise_exception(message: str) -> None:
    raise InputError(f"chat template refused the conversation: {message}")


@dataclass
class DeviceTokenizer:
    tok: object  # tokenizers.Tokenizer
    chat_template: str | None
    special: dict  # bos_token / eos_token strings for templates

    @staticmethod
    def load(path: str, chat_template: str | None, special: dict | None = None) -> DeviceTokenizer:
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise InputError(f"{path}: tokenizer file missing from the artifacts; re-export the model")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise CorruptFileError(f"{path}: not a valid tokenizer.json ({str(e)[:200]})") from None
        return DeviceTokenizer(tok, chat_template, dict(special or {}))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InputError("this model has no chat template; call with chat=False")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.special.get("bos_token") or "",
                               eos_token=self.special.get("eos_token") or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)
