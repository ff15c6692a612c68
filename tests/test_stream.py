"""The built-in continual task stream: determinism, splits, labels checked against the pixels, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.data import read_examples
from edgekv.data import stream as st
from edgekv.errors import InputError

runner = CliRunner()
SMALL = st.SplitSizes(train=16, val=4, test=8)


def _tree(root: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def edge6(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("streams") / "edge6")
    st.write_stream("edge6", out, seed=0)
    return out


@pytest.fixture(scope="module")
def loaded(edge6) -> st.Stream:
    return st.load_stream(edge6)


def _ink(path: str) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)  # [H, W, 3]
    return rgb.min(axis=2) < 200  # [H, W] drawn pixels (white background)


def test_default_stream_shape(loaded):
    assert loaded.name == "edge6" and loaded.seed == 0
    assert loaded.order == list(st.STREAMS["edge6"])
    assert len(loaded.order) >= 6
    kinds = [t.kind for t in loaded.tasks]
    assert kinds.count("image") >= 3 and kinds.count("text") >= 2
    sizes = {t.name: (len(t.train), len(t.val), len(t.test)) for t in loaded.tasks}
    assert sizes == {"shape-code": (48, 16, 24), "glorp-words": (48, 16, 32), "count-roman": (48, 20, 25),
                     "date-house": (48, 16, 24), "digit-velan": (48, 20, 30), "home-city": (48, 16, 32)}


def test_split_sizes_round_up_to_the_concept_count():
    assert st.SplitSizes().balanced(16) == st.SplitSizes(48, 16, 32)
    assert st.SplitSizes().balanced(5) == st.SplitSizes(48, 20, 25)
    assert st.SplitSizes().balanced(1) == st.SplitSizes()
    assert st.SplitSizes(7, 3, 6).balanced(6) == st.SplitSizes(7, 6, 6)  # train keeps its size


def _concept(task: str, ex) -> str:
    """The concept of a loaded example, recovered from its prompt (text) or answer (image: 1-1 labels)."""
    if task == "glorp-words":
        return re.search(r"'([a-z]+)'", ex.prompt).group(1)
    if task == "home-city":
        return next(p for p in st.HOMES if p in ex.prompt)
    return "format" if task == "date-house" else ex.answer


@pytest.fixture(scope="module")
def all_tasks(tmp_path_factory) -> tuple[str, st.Stream]:
    out = str(tmp_path_factory.mktemp("streams") / "all")
    st.write_stream("all", out, seed=5, order=list(st.TASKS))
    return out, st.load_stream(out)


def test_val_and_test_are_balanced_over_concepts(all_tasks):
    out, s = all_tasks
    meta = {t["name"]: t for t in json.load(open(os.path.join(out, "stream.json")))["tasks"]}
    num = {"glorp-words": 16, "home-city": 16, "digit-velan": 10, "colour-tag": 6, "count-roman": 5,
           "shape-code": 4, "date-house": 1}
    assert set(num) == set(st.TASKS)
    for t in s.tasks:
        for split, default in (("val", 16), ("test", 24)):
            exs = t.split(split)
            counts: dict[str, int] = {}
            for ex in exs:
                counts[_concept(t.name, ex)] = counts.get(_concept(t.name, ex), 0) + 1
            assert len(counts) == num[t.name] and len(set(counts.values())) == 1, (t.name, split, counts)
            assert len(exs) == -(-default // num[t.name]) * num[t.name], (t.name, split)
            recorded = meta[t.name]["concept_counts"][split]
            assert sorted(recorded.values()) == sorted(counts.values()) and sum(recorded.values()) == len(exs)
        train_concepts = {_concept(t.name, ex) for ex in t.train}
        assert len(train_concepts) == num[t.name], t.name  # every concept is taught in train
        assert sum(meta[t.name]["concept_counts"]["train"].values()) == len(t.train) == 48


def test_balanced_splits_share_no_prompt_and_are_deterministic(all_tasks, tmp_path):
    out, s = all_tasks
    for t in s.tasks:
        keys = {sp: {_key(e) for e in t.split(sp)} for sp in st.SPLITS}
        assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"], t.name
        assert not keys["val"] & keys["test"], t.name
        if t.name in ("glorp-words", "home-city"):  # distinct (concept, phrasing) pairs: prompts alone differ
            prompts = [e.prompt for sp in st.SPLITS for e in t.split(sp)]
            assert len(set(prompts)) == len(prompts), t.name
    again = str(tmp_path / "again")
    st.write_stream("all", again, seed=5, order=list(st.TASKS))
    assert _tree(again) == _tree(out)


def test_second_order_is_a_permutation_with_identical_task_data(tmp_path, edge6):
    assert sorted(st.STREAMS["edge6-rev"]) == sorted(st.STREAMS["edge6"])
    assert st.STREAMS["edge6-rev"] != st.STREAMS["edge6"]
    rev = str(tmp_path / "rev")
    st.write_stream("edge6-rev", rev, seed=0)
    a, b = _tree(edge6), _tree(rev)
    tasks_a = {k: v for k, v in a.items() if k.startswith("tasks")}
    assert tasks_a == {k: v for k, v in b.items() if k.startswith("tasks")}  # the order never changes a task
    assert json.load(open(os.path.join(rev, "stream.json")))["order"] == list(st.STREAMS["edge6-rev"])


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path, edge6):
    again = str(tmp_path / "again")
    st.write_stream("edge6", again, seed=0)
    assert _tree(again) == _tree(edge6)
    other = str(tmp_path / "s1")
    st.write_stream("edge6", other, seed=1)
    a, b = _tree(edge6), _tree(other)
    assert a.keys() == b.keys()
    for task in st.STREAMS["edge6"]:
        assert a[f"tasks/{task}/test.json"] != b[f"tasks/{task}/test.json"] or \
            any(a[k] != b[k] for k in a if k.startswith(f"tasks/{task}/images/"))
    # the label mappings are constants: seed 1 teaches the same answers
    s1 = st.read_stream_dir(other)
    for t in s1.tasks:
        if t.label_map:
            assert {e.answer for e in t.train} == set(t.label_map.values())


def _key(ex) -> str:
    h = hashlib.sha256(ex.prompt.encode())
    if ex.image is not None:
        h.update(np.asarray(Image.open(ex.image)).tobytes())
    return h.hexdigest()


def test_splits_are_disjoint_and_test_concepts_occur_in_train(loaded, edge6):
    meta = json.load(open(os.path.join(edge6, "stream.json")))
    for t, m in zip(loaded.tasks, meta["tasks"], strict=True):
        keys = {s: [_key(e) for e in t.split(s)] for s in st.SPLITS}
        for s in st.SPLITS:
            assert len(set(keys[s])) == len(keys[s]), (t.name, s)
        assert not set(keys["train"]) & set(keys["test"]), t.name
        assert not set(keys["train"]) & set(keys["val"]), t.name
        assert not set(keys["val"]) & set(keys["test"]), t.name
        assert set(m["concepts"]["test"]) <= set(m["concepts"]["train"]), t.name
        if t.label_map:  # every test answer is taught in train
            assert {e.answer for e in t.test} <= {e.answer for e in t.train}, t.name


def test_text_labels_follow_the_mapping(loaded):
    by = {t.name: t for t in loaded.tasks}
    for ex in by["glorp-words"].train + by["glorp-words"].test:
        word = re.search(r"'([a-z]+)'", ex.prompt).group(1)
        assert ex.answer == st.GLORP[word]
    train_words = {re.search(r"'([a-z]+)'", e.prompt).group(1) for e in by["glorp-words"].train}
    assert train_words == set(st.GLORP)
    for ex in by["home-city"].test:
        person = next(p for p in st.HOMES if p in ex.prompt)
        assert ex.answer == st.HOMES[person]
        assert any(person in e.prompt for e in by["home-city"].train)
    for ex in by["date-house"].train + by["date-house"].test:
        written = re.search(r"([A-Z][a-z]+ \d{1,2}, \d{4})", ex.prompt).group(1)
        assert ex.answer == datetime.strptime(written, "%B %d, %Y").strftime("%d%b%Y").upper()


def _shape_of(ink: np.ndarray) -> str:
    ys, xs = np.nonzero(ink)
    fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # area / bounding box
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.46 else "star"


def test_image_labels_match_the_pixels(loaded):
    from scipy import ndimage

    by = {t.name: t for t in loaded.tasks}
    codes = {v: k for k, v in st.SHAPE_CODES.items()}
    for ex in by["shape-code"].train + by["shape-code"].test:
        assert _shape_of(_ink(ex.image)) == codes[ex.answer], ex.id
    roman = {v: k for k, v in st.ROMAN.items()}
    for ex in by["count-roman"].train + by["count-roman"].test:
        assert ndimage.label(_ink(ex.image))[1] == roman[ex.answer], ex.id  # separate blobs = objects


def test_digit_labels_and_handwriting_split(loaded):
    from sklearn.datasets import load_digits

    digits = load_digits()
    ref = 255.0 - digits.images * (255.0 / 16.0)  # [1797, 8, 8] as scenes.digit_image draws them
    velan = {v: int(k) for k, v in st.DIGIT_NAMES.items()}
    task = next(t for t in loaded.tasks if t.name == "digit-velan")
    for split, parity in (("train", 0), ("test", 1)):
        for ex in task.split(split):
            grey = np.asarray(Image.open(ex.image).convert("L")).astype(float)[16:112, 16:112]  # [96, 96]
            small = grey.reshape(8, 12, 8, 12).mean(axis=(1, 3))  # [8, 8]
            i = int(np.argmin(((ref - small) ** 2).sum(axis=(1, 2))))
            assert digits.target[i] == velan[ex.answer], ex.id
            assert i % 2 == parity, ex.id  # test handwriting is never seen in train


def test_files_are_llava_and_images_exist(edge6):
    meta = json.load(open(os.path.join(edge6, "stream.json")))
    assert meta["format"] == st.FORMAT and meta["version"] == 1 and meta["seed"] == 0
    for t in meta["tasks"]:
        for split, rel in t["files"].items():
            path = os.path.join(edge6, rel)
            recs = json.load(open(path))
            assert len(recs) == t["num_examples"][split]
            for r in recs:
                assert set(r) <= {"id", "image", "conversations"}
                human, gpt = r["conversations"]
                assert (human["from"], gpt["from"]) == ("human", "gpt")
                assert len(gpt["value"]) <= 12 and gpt["value"] == gpt["value"].strip()
                if t["kind"] == "image":
                    assert human["value"].startswith("<image>\n")
                    img = Image.open(os.path.join(os.path.dirname(path), r["image"]))
                    assert img.size == (128, 128) and img.mode == "RGB"
                else:
                    assert "image" not in r and "<image>" not in human["value"]
            exs = read_examples(path)  # the reader adapt uses
            assert [e.id for e in exs] == [r["id"] for r in recs]


def test_loaded_images_are_absolute_and_exist(loaded):
    for t in loaded.tasks:
        for ex in t.train + t.val + t.test:
            if t.kind == "image":
                assert os.path.isabs(ex.image) and os.path.isfile(ex.image)
            else:
                assert ex.image is None


def test_load_builtin_name_materialises_once(tmp_path):
    s = st.load_stream("edge6-rev", seed=2, cache_dir=str(tmp_path))
    meta = tmp_path / "streams" / "edge6-rev-s2" / "stream.json"
    assert meta.is_file() and s.order == list(st.STREAMS["edge6-rev"]) and s.seed == 2
    before = meta.stat().st_mtime_ns
    assert st.load_stream("edge6-rev", seed=2, cache_dir=str(tmp_path)).order == s.order
    assert meta.stat().st_mtime_ns == before


def test_interrupted_write_leaves_no_half_stream(tmp_path, monkeypatch):
    out = tmp_path / "s"
    st.write_stream("x", str(out), order=["home-city"], sizes=SMALL)
    old = _tree(str(out))
    real = st._write_task
    calls = []

    def boom(root, task, seed, sizes):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(root, task, seed, sizes)

    monkeypatch.setattr(st, "_write_task", boom)
    with pytest.raises(KeyboardInterrupt):
        st.write_stream("edge6", str(out), sizes=SMALL)
    assert _tree(str(out)) == old  # the previous stream is untouched
    assert sorted(os.listdir(tmp_path)) == ["s"]  # and no temp folder is left


def test_custom_order_and_sizes(tmp_path):
    s = st.read_stream_dir(os.path.dirname(
        st.write_stream("mine", tmp_path / "m", seed=3, order=["colour-tag", "date-house"], sizes=SMALL)))
    assert s.order == ["colour-tag", "date-house"]
    assert [len(t.train) for t in s.tasks] == [16, 16]
    assert [len(t.test) for t in s.tasks] == [12, 8]  # colour-tag: 8 rounded up to a multiple of 6 concepts
    assert {e.answer for e in s.tasks[0].train} == set(st.COLOUR_TAGS.values())


@pytest.mark.parametrize("kwargs,msg", [
    ({"name": "nope"}, "unknown stream 'nope'"),
    ({"name": "x", "order": ["shape-code", "nope"]}, "unknown task 'nope'"),
    ({"name": "x", "order": ["shape-code", "shape-code"]}, "named twice"),
    ({"name": "edge6", "sizes": st.SplitSizes(100, 20, 20)}, "at most 128 (got 164)"),  # 20 -> 32 per split
    ({"name": "edge6", "sizes": st.SplitSizes(100, 16, 16)}, "at most 128 (got 132)"),
    ({"name": "edge6", "sizes": st.SplitSizes(3, 2, 2)}, "train size 3 cannot hold its 4 concepts"),
    ({"name": "edge6", "seed": -1}, "seed"),
])
def test_bad_requests(tmp_path, kwargs, msg):
    with pytest.raises(InputError, match=re.escape(msg)):
        st.write_stream(out_dir=tmp_path / "o", **kwargs)
    assert not os.path.exists(tmp_path / "o")


def test_split_sizes_validate():
    with pytest.raises(InputError, match=r"SplitSizes.val: 0 must be a positive integer"):
        st.SplitSizes(4, 0, 4)


def test_normalisation():
    assert st.is_correct(" zorp.\nmore text", "ZORP")
    assert st.is_correct("07mar2024", "07MAR2024") and not st.is_correct("7MAR2024", "07MAR2024")
    assert not st.is_correct("III", "II")
    assert st.normalise_answer("  New   York. ") == "new york"


def test_cli_list():
    res = runner.invoke(app, ["stream", "list", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["streams"]["edge6"] == list(st.STREAMS["edge6"])
    assert data["tasks"]["count-roman"]["kind"] == "image"


def test_cli_write(tmp_path):
    out = tmp_path / "w"
    res = runner.invoke(app, ["stream", "write", "x", "--out", str(out), "--order", "home-city,glorp-words",
                              "--seed", "4", "--train", "16", "--val", "4", "--test", "8", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["order"] == ["home-city", "glorp-words"] and data["seed"] == 4
    assert len(st.load_stream(str(out)).tasks[1].test) == 16  # 8 rounded up to glorp-words' 16 concepts


@pytest.mark.parametrize("args,msg", [
    (["stream", "write", "nope", "--out", "{d}/o"], "unknown stream 'nope'"),
    (["stream", "write", "edge6", "--out", "{d}/file"], "exists and is not a folder"),
    (["stream", "write", "edge6", "--out", "{d}/full"], "holds no stream.json"),
    (["stream", "write", "edge6", "--out", "{d}/o", "--train", "0"], "SplitSizes.train: 0"),
])
def test_cli_errors_are_one_line(tmp_path, args, msg):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    res = runner.invoke(app, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekv: error: ") and msg in lines[0]
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not a folder with a stream.json nor a built-in stream"):
        st.load_stream("no-such-stream")
    with pytest.raises(InputError, match="holds no stream.json"):
        st.load_stream(str(tmp_path))
    (tmp_path / "stream.json").write_text('{"tasks": [{"name": "a", "files": {"train": "a.json"}}]}')
    with pytest.raises(InputError, match=r"tasks\[0\].files.val is missing"):
        st.load_stream(str(tmp_path))


@pytest.mark.slow
def test_answers_are_short_for_smollm2(loaded):
    """Every answer (and the Roman numerals' 'IV') fits the 8 new tokens bench generates."""
    from transformers import AutoTokenizer

    from edgekv.host.models import _builtin_folder

    tok = AutoTokenizer.from_pretrained(_builtin_folder("smollm2-135m"))
    lengths = {e.answer: len(tok(e.answer, add_special_tokens=False)["input_ids"])
               for t in loaded.tasks for e in t.train + t.test}
    assert max(lengths.values()) <= 8, max(lengths.items(), key=lambda kv: kv[1])
    assert lengths["ZORP"] == 3 and lengths["III"] == 1
