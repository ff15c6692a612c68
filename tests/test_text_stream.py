"""Incremental detokenisation (``edgekv.runtime.tokenizer.TextStream``): streamed pieces, one
token at a time, concatenate to the whole decode for multi-byte UTF-8 split across tokens, with
``tokenizers``' DecodeStream and with the re-decoding fallback; through the runtime, streamed
output with stop strings (spanning token boundaries) equals the non-streamed output, and a
generation decodes its ids whole only once."""

from __future__ import annotations

import string

import pytest

import edgekv.runtime.runtime as runtime_module
import edgekv.runtime.tokenizer as tokenizer_module
from edgekv.runtime.runtime import GenerationResult
from edgekv.runtime.tokenizer import DeviceTokenizer

TEXTS = ["café naïve 😀 日本語 ok 🎉🎉 über!", "ÀÉÎÕÜ ñ ß ø — “quoted” 👩‍💻 end", "plain ascii text"]


def byte_level(tmp_path) -> DeviceTokenizer:
    """The tests' byte-level BPE (tiny_models.train_tokenizer): emoji and accents split across tokens."""
    from tiny_models import train_tokenizer

    path = str(tmp_path / "byte-level.json")
    train_tokenizer().backend_tokenizer.save(path)
    return DeviceTokenizer.load(path, None)


def byte_fallback(tmp_path) -> DeviceTokenizer:
    """A SentencePiece-style tokenizer (Llama, Gemma): '▁' for spaces, unknown characters as
    <0xNN> byte tokens, the first space stripped by the decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁" + string.ascii_letters + "éü.,!?":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    path = str(tmp_path / "byte-fallback.json")
    tok.save(path)
    return DeviceTokenizer.load(path, None)


@pytest.fixture(params=["decode-stream", "re-decode"])
def mode(request, monkeypatch):
    """DecodeStream (the installed tokenizers has it), or the fallback as without it."""
    if request.param == "decode-stream":
        pytest.importorskip("tokenizers.decoders").DecodeStream  # noqa: B018
    else:
        monkeypatch.setattr(tokenizer_module, "_decode_stream", lambda: None)
    return request.param


@pytest.mark.parametrize("make", [byte_level, byte_fallback])
def test_pieces_concatenate_to_the_whole_decode(make, mode, tmp_path):
    tok = make(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        stream = tok.text_stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) == stream.text == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
        if not text.isascii():  # some character spans tokens: its first tokens add nothing
            assert "" in pieces


def test_a_failing_decode_stream_falls_back_to_re_decoding(tmp_path, monkeypatch):
    class Broken:
        def step(self, tokenizer, token):
            raise Exception("invalid prefix")

    tok = byte_level(tmp_path)
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    stream = tok.text_stream()
    pieces = [stream.push(i) for i in ids[:5]]
    stream._stream = Broken()
    pieces += [stream.push(i) for i in ids[5:]]
    assert "".join(pieces) == tok.decode(ids) and stream._stream is None


# --- through the runtime ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(exported):
    from edgekv.runtime import Runtime

    with Runtime.load(exported("llama"), threads=1) as rt:
        yield rt


def scripted(rt, monkeypatch, ids: list[int]) -> None:
    """The next generation samples exactly ``ids``, then EOS."""
    script = iter(list(ids))
    eos = min(rt.eos_ids)
    monkeypatch.setattr(runtime_module, "next_token", lambda *args: next(script, eos))


def streamed(rt, monkeypatch, ids, stop=()) -> tuple[list[str], GenerationResult]:
    scripted(rt, monkeypatch, ids)
    res = GenerationResult()
    pieces = list(rt.stream("hello", len(ids) + 1, result=res, stop=stop, use_memory=False))
    return pieces, res


def generated(rt, monkeypatch, ids, stop=()) -> GenerationResult:
    scripted(rt, monkeypatch, ids)
    return rt.generate("hello", len(ids) + 1, stop=stop, use_memory=False)


def test_streamed_multibyte_text_is_the_whole_decode(rt, mode, monkeypatch):
    for text in TEXTS:
        ids = rt.tokenizer.encode(text, add_special_tokens=False)
        pieces, res = streamed(rt, monkeypatch, ids)
        assert "".join(pieces) == res.text == rt.tokenizer.decode(ids) == text
        assert res.token_ids == ids and res.stop_reason == "eos"
        assert generated(rt, monkeypatch, ids).text == text


def test_stop_strings_across_token_boundaries(rt, mode, monkeypatch):
    text = TEXTS[0]
    ids = rt.tokenizer.encode(text, add_special_tokens=False)
    # stop strings that begin and end inside tokens and inside multi-byte characters' tokens
    for stop in (["😀 日"], ["naïve"], ["é n"], ["🎉🎉"], ["ber!"], ["ok", "日本"], ["never", "über"], ["zzz"]):
        want = min((text.find(s) for s in stop if s in text), default=len(text))
        pieces, res = streamed(rt, monkeypatch, ids, stop)
        plain = generated(rt, monkeypatch, ids, stop)
        assert "".join(pieces) == res.text == plain.text == text[:want], stop
        assert res.stop_reason == plain.stop_reason == ("stop" if want < len(text) else "eos")
        assert not any(s in p or s in "".join(pieces) for s in stop for p in pieces)


def test_a_generation_decodes_its_ids_whole_once(rt, monkeypatch):
    """With DecodeStream each token costs a short decode; the whole answer is decoded once, at the end."""
    pytest.importorskip("tokenizers.decoders").DecodeStream  # noqa: B018
    ids = rt.tokenizer.encode(TEXTS[1] * 3, add_special_tokens=False)
    calls = []
    real = rt.tokenizer.decode
    monkeypatch.setattr(rt.tokenizer, "decode", lambda ids: calls.append(len(ids)) or real(ids))
    pieces, res = streamed(rt, monkeypatch, ids)
    assert "".join(pieces) == res.text == TEXTS[1] * 3 and calls == [len(ids)]
