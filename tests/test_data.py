"""Task data readers: LLaVA conversations and simple JSONL, with errors naming file, line, field."""

from __future__ import annotations

import json

import pytest

from edgekv.data import Example, default_task_name, read_examples, write_jsonl
from edgekv.errors import InputError


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_simple_jsonl(tmp_path):
    p = _write(tmp_path / "t.jsonl",
               '{"id": "a", "prompt": " code for apple? ", "answer": "K7"}\n\n'
               '{"id": 7, "prompt": "what is shown?", "answer": "a dog", "image": "img/1.png"}\n')
    assert read_examples(p) == [Example("a", "code for apple?", "K7", None),
                                Example("7", "what is shown?", "a dog", "img/1.png")]


def test_llava_json_multi_turn_gives_one_example_per_pair(tmp_path):
    recs = [
        {"id": "r1", "image": "coco/1.jpg", "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "<image>\nWhat colour is the bus?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many wheels?"},
            {"from": "gpt", "value": "Four."}]},
        {"id": "r2", "conversations": [{"from": "user", "value": "Describe it.\n<image>"},
                                       {"from": "assistant", "value": "A cat."}]},
    ]
    p = _write(tmp_path / "t.json", json.dumps(recs, indent=2))
    assert read_examples(p) == [
        Example("r1", "What colour is the bus?", "Red.", "coco/1.jpg"),
        Example("r1#2", "How many wheels?", "Four.", "coco/1.jpg"),
        Example("r2", "Describe it.", "A cat.", None),
    ]


def test_json_single_object_and_round_trip(tmp_path):
    p = _write(tmp_path / "one.json", '{"id": "x", "prompt": "p", "answer": "a"}')
    exs = read_examples(p)
    assert exs == [Example("x", "p", "a")]
    out = tmp_path / "out.jsonl"
    write_jsonl(out, exs + [Example("y", "q", "b", "i.png")])
    assert read_examples(out) == exs + [Example("y", "q", "b", "i.png")]


# --- errors name the file, the line the record starts on, and the field --------------
@pytest.mark.parametrize("line2, match", [
    ('{"id": "b", "prompt": "p"}', r"line 2: field 'answer' is missing"),
    ('{"id": "b", "prompt": "p", "answer": 3}', r"line 2: field 'answer' must be a string"),
    ('{"id": "b", "prompt": "  ", "answer": "a"}', r"line 2: field 'prompt' is empty"),
    ('{"prompt": "p", "answer": "a"}', r"line 2: field 'id' is missing"),
    ('{"id": "a", "prompt": "p", "answer": "a"}', r"line 2: field 'id' 'a' repeats the record on line 1"),
    ('{"id": "b", "prompt": "p", "answer": "a", "image": 5}', r"line 2: field 'image' must be"),
    ('{"id": "b", "text": "p"}', r"line 2: record has neither 'conversations'"),
    ('{"id": "b", "prompt": "p", ', r"line 2: not valid JSON"),
    ('[1, 2]', r"line 2: a record must be a JSON object"),
])
def test_jsonl_errors(tmp_path, line2, match):
    p = _write(tmp_path / "bad.jsonl", '{"id": "a", "prompt": "p", "answer": "a"}\n' + line2 + "\n")
    with pytest.raises(InputError, match=match) as e:
        read_examples(p)
    assert str(e.value).startswith(p)


@pytest.mark.parametrize("conv, match", [
    ([{"from": "gpt", "value": "hi"}], r"field 'conversations\[0\].from': a gpt turn without a human"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], r"field 'conversations\[1\].from': two human"),
    ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], r"field 'conversations\[1\].from' is 'robot'"),
    ([{"from": "human"}, {"from": "gpt", "value": "b"}], r"field 'conversations\[0\].value' is missing"),
    ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "b"}], r"field 'conversations\[0\].value' is empty"),
    ([{"from": "human", "value": "a"}], r"field 'conversations' holds no human/gpt pair"),
    ([], r"field 'conversations' must be a non-empty list"),
])
def test_llava_errors_point_at_the_record_line(tmp_path, conv, match):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    text = "[\n" + json.dumps(good) + ",\n\n  " + json.dumps({"id": "bad", "conversations": conv}) + "\n]\n"
    p = _write(tmp_path / "bad.json", text)
    with pytest.raises(InputError, match=r"bad.json: line 4: " + match):
        read_examples(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds no records"):
        read_examples(_write(tmp_path / "empty.json", "[]"))
    with pytest.raises(InputError, match="must hold an array"):
        read_examples(_write(tmp_path / "num.json", "42"))
    with pytest.raises(InputError, match=r"line 3: not valid JSON"):
        read_examples(_write(tmp_path / "trunc.json", '[\n{"id": "a", "prompt": "p", "answer": "a"},\n{"id": '))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        read_examples(tmp_path / "bin.jsonl")


def test_example_is_frozen():
    ex = Example("a", "p", "q")
    with pytest.raises(AttributeError):
        ex.prompt = "x"  # type: ignore[misc]


@pytest.mark.parametrize("path, name", [
    ("edge6/tasks/shape-code/train.json", "shape-code"),  # the documented layout: the folder names the task
    ("tasks/receipts/val.jsonl", "receipts"),
    ("x/Validation.JSONL", "x"),  # generic in any case
    ("tasks/faq/examples", "faq"),
    ("/abs/tasks/support-faq/test.jsonl", "support-faq"),
    ("receipts.jsonl", "receipts"),  # a specific file name is the name
    ("data/receipts.json", "receipts"),
    ("tasks/shape-code/train_v2.json", "train_v2"),
    ("train.json", None),  # generic, and no folder in the path
    ("./train.json", None),
    ("../train.jsonl", None),
    ("/train.json", None),
    ("data/train.json", None),  # the folder is generic too
    ("tasks/dataset/all.jsonl", None),
])
def test_default_task_name(path, name):
    assert default_task_name(path) == name
