"""Task data readers: LLaVA-style conversations and a simple prompt/answer JSONL.

Two record shapes are accepted, in ``.json`` (one array of records, or one record) or
``.jsonl`` (one record per line) files:

* LLaVA: ``{"id", "image"?, "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}, ...]}``. Every human turn followed by a gpt turn
  becomes one :class:`Example` (a multi-turn record gives several); the first keeps the
  record's id, later ones are ``id#2``, ``id#3``, ... ``system`` turns are skipped. The
  ``<image>`` placeholder is removed from the prompt text; the record's image path is
  kept on every example it yields (the vision tower, when there is one, splices its
  tokens in; text-only backbones ignore it).
* simple: ``{"id", "prompt", "answer", "image"?}``.

A record that does not fit is an :class:`~edgekv.errors.InputError` naming the file, the
line the record starts on, and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edgekv.errors import InputError

IMAGE_TOKEN = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)


@dataclass(frozen=True)
class Example:
    """One training example: a user prompt and the answer the model should give."""

    id: str
    prompt: str
    answer: str
    image: str | None = None


def _where(path: str, line: int) -> str:
    return f"{path}: line {line}"


def _text_field(rec: dict, name: str, path: str, line: int, where: str = "") -> str:
    value = rec.get(name)
    at = f"{where}{name}"
    if value is None:
        raise InputError(f"{_where(path, line)}: field '{at}' is missing")
    if not isinstance(value, str):
        raise InputError(f"{_where(path, line)}: field '{at}' must be a string, got {type(value).__name__}")
    try:  # JSON escapes can spell lone surrogates, which no tokenizer can encode
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{_where(path, line)}: field '{at}' is not valid Unicode (a lone surrogate escape)") from None
    return value


def _record_id(rec: dict, path: str, line: int) -> str:
    if "id" not in rec:
        raise InputError(f"{_where(path, line)}: field 'id' is missing")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise InputError(f"{_where(path, line)}: field 'id' must be a non-empty string or integer")
    return str(rid)


def _image(rec: dict, path: str, line: int) -> str | None:
    img = rec.get("image")
    if img is None:
        return None
    if not isinstance(img, str) or not img.strip():
        raise InputError(f"{_where(path, line)}: field 'image' must be a non-empty string (a path)")
    return img


def strip_image_token(text: str) -> str:
    """Remove the ``<image>`` placeholder (and the newline that usually follows it)."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def _nonempty(text: str, field_name: str, path: str, line: int) -> str:
    if not text.strip():
        raise InputError(f"{_where(path, line)}: field '{field_name}' is empty")
    return text


def parse_record(rec: object, path: str, line: int) -> list[Example]:
    """Examples of one record (LLaVA or simple); raises InputError naming file, line, field."""
    if not isinstance(rec, dict):
        raise InputError(f"{_where(path, line)}: a record must be a JSON object, got {type(rec).__name__}")
    rid = _record_id(rec, path, line)
    image = _image(rec, path, line)
    if "conversations" in rec:
        return _parse_llava(rec, rid, image, path, line)
    if "prompt" in rec or "answer" in rec:
        prompt = _nonempty(_text_field(rec, "prompt", path, line).strip(), "prompt", path, line)
        answer = _nonempty(_text_field(rec, "answer", path, line).strip(), "answer", path, line)
        return [Example(rid, prompt, answer, image)]
    raise InputError(f"{_where(path, line)}: record has neither 'conversations' (LLaVA) nor "
                     f"'prompt'/'answer' (simple JSONL)")


def _parse_llava(rec: dict, rid: str, image: str | None, path: str, line: int) -> list[Example]:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{_where(path, line)}: field 'conversations' must be a non-empty list of turns")
    out: list[Example] = []
    pending: str | None = None
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]."
        if not isinstance(turn, dict):
            raise InputError(f"{_where(path, line)}: field 'conversations[{i}]' must be an object")
        role = _text_field(turn, "from", path, line, where).strip().lower()
        value = _text_field(turn, "value", path, line, where)
        if role in SYSTEM_ROLES:
            continue
        if role in HUMAN_ROLES:
            if pending is not None:
                raise InputError(f"{_where(path, line)}: field '{where}from': two human turns in a row "
                                 f"(expected human/gpt pairs)")
            pending = _nonempty(strip_image_token(value), f"{where}value", path, line)
        elif role in ASSISTANT_ROLES:
            if pending is None:
                raise InputError(f"{_where(path, line)}: field '{where}from': a gpt turn without a human "
                                 f"turn before it")
            answer = _nonempty(value.strip(), f"{where}value", path, line)
            ex_id = rid if not out else f"{rid}#{len(out) + 1}"
            out.append(Example(ex_id, pending, answer, image))
            pending = None
        else:
            raise InputError(f"{_where(path, line)}: field '{where}from' is {role!r}; expected "
                             f"'human' or 'gpt'")
    if not out:
        raise InputError(f"{_where(path, line)}: field 'conversations' holds no human/gpt pair")
    return out


def _json_limit_error(e: Exception) -> str:
    """What a hostile but syntactically valid JSON text hit in the parser."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(":")[0]  # e.g. an integer of more than 4300 digits


def _iter_jsonl(text: str, path: str) -> Iterator[tuple[int, object]]:
    # split on "\n" only: str.splitlines() also breaks at U+2028 etc., which JSON strings may hold
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{_where(path, n)}: not valid JSON ({e.msg}, column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise InputError(f"{_where(path, n)}: not usable JSON ({_json_limit_error(e)})") from None
        yield n, rec


def _iter_json(text: str, path: str) -> Iterator[tuple[int, object]]:
    """Records of a JSON array (or one object), each with the line it starts on."""
    dec = json.JSONDecoder()
    counted = [0, 1]  # (position, line at that position): counting on from the last call keeps it linear

    def line_of(pos: int) -> int:
        at, line = counted
        line = line + text.count("\n", at, pos) if pos >= at else text.count("\n", 0, pos) + 1
        counted[:] = [pos, line]
        return line

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def decode(pos: int) -> tuple[object, int]:
        try:
            return dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"{_where(path, e.lineno)}: not valid JSON ({e.msg}, column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise InputError(f"{_where(path, line_of(pos))}: not usable JSON ({_json_limit_error(e)})") from None

    pos = skip_ws(0)
    if pos < len(text) and text[pos] == "{":
        obj, end = decode(pos)
        if skip_ws(end) != len(text):
            raise InputError(f"{_where(path, line_of(end))}: extra data after the record "
                             f"(use .jsonl for one record per line)")
        yield line_of(pos), obj
        return
    if pos >= len(text) or text[pos] != "[":
        raise InputError(f"{_where(path, line_of(pos))}: a .json task file must hold an array of records")
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start = pos
        obj, pos = decode(pos)
        yield line_of(start), obj
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise InputError(f"{_where(path, line_of(pos))}: extra data after the array")
            return
        raise InputError(f"{_where(path, line_of(pos))}: not valid JSON (expected ',' or ']')")


def read_examples(path: str | os.PathLike) -> list[Example]:
    """All examples in a task file (``.json`` array/object or ``.jsonl``), in file order.

    Ids must be unique within the file (they name memory entries).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: task data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    is_jsonl = path.endswith(".jsonl") or (not path.endswith(".json") and not text.lstrip().startswith("["))
    records = _iter_jsonl(text, path) if is_jsonl else _iter_json(text, path)
    out: list[Example] = []
    seen: dict[str, int] = {}
    for line, rec in records:
        for ex in parse_record(rec, path, line):
            if ex.id in seen:
                raise InputError(f"{_where(path, line)}: field 'id' {ex.id!r} repeats the record on line "
                                 f"{seen[ex.id]}; ids must be unique")
            seen[ex.id] = line
            out.append(ex)
    if not out:
        raise InputError(f"{path}: holds no records")
    return out


# File and folder names that say which split or what kind of file it is, not which task
GENERIC_DATA_NAMES = frozenset({"train", "val", "valid", "validation", "test", "data", "dataset", "examples", "all"})


def default_task_name(data_path: str | os.PathLike) -> str | None:
    """The task name for a data file when none is given: the file's name without its extension
    (``tasks/receipts.jsonl`` -> ``receipts``), or, when that is generic (a split name such as
    ``train``, see :data:`GENERIC_DATA_NAMES`), the name of the folder the path gives
    (``edge6/tasks/shape-code/train.json`` -> ``shape-code``). None when that is generic too
    or the path gives no folder (``train.json``): the caller must name the task. Looks at the
    path only (no file system access, no working folder).
    """
    head, name = os.path.split(os.path.normpath(os.fspath(data_path)))
    stem = os.path.splitext(name)[0]
    if stem and stem.lower() not in GENERIC_DATA_NAMES:
        return stem
    parent = os.path.basename(head)
    if parent in ("", ".", "..") or parent.lower() in GENERIC_DATA_NAMES:
        return None
    return parent


def write_jsonl(path: str | os.PathLike, examples: list[Example]) -> None:
    """Write examples as simple JSONL (``id``, ``prompt``, ``answer``, ``image`` when set)."""
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for ex in examples:
            rec = {"id": ex.id, "prompt": ex.prompt, "answer": ex.answer}
            if ex.image is not None:
                rec["image"] = ex.image
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def resolve_images(examples: Sequence[Example], root: str | None) -> list[Example]:
    """The examples with relative image paths joined to ``root`` (the data file's folder) and
    normalised; absolute paths, and every path when ``root`` is None, stay as given."""
    from dataclasses import replace

    if root is None:
        return list(examples)
    return [replace(ex, image=os.path.normpath(os.path.join(root, ex.image)))
            if ex.image is not None and not os.path.isabs(ex.image) else ex for ex in examples]
