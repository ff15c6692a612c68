"""Offline continual task streams for the benchmark: built-in tasks, writing and loading.

A stream is an ordered list of tasks, each with train / val / test splits, written in the
LLaVA layout a user's own data would have::

    DIR/stream.json                       name, seed, order, sizes, tasks, answer normalisation
    DIR/tasks/<task>/{train,val,test}.json  LLaVA records (``id``, ``image``?, ``conversations``)
    DIR/tasks/<task>/images/*.png         images, referenced relative to the split file's folder

Built-in tasks are made from data that installs with the package (procedural scenes,
scikit-learn's digits, generated text, see :mod:`edgekv.data.scenes`). Each one asks for
something the frozen backbone cannot know zero-shot (an invented label set, code or
format) but a retrieved example of the same concept shows: test items are new instances
(new scenes, new digit images, new phrasings or dates) of concepts that occur in train.

Seeds: the label mappings are fixed constants of the task (so results for several seeds
are comparable); the seed picks the instances (scenes, digit samples, phrasings, dates)
and which of them land in which split. Every task draws from its own generator keyed by
``(seed, task name)``, so the order of the stream never changes a task's data.

Balanced splits: val and test hold every concept of a task equally often. Their sizes
(``SplitSizes``, default 16 val / 24 test) are rounded UP to a multiple of the task's number
of concepts (:meth:`SplitSizes.balanced`): test 24 becomes 32 for glorp-words and home-city
(16 concepts), 30 for digit-velan (10), 24 for colour-tag (6), 25 for count-roman (5), 24
for shape-code (4) and date-house (1 concept); val 16 likewise (16, 16, 20, 18, 20, 16, 16).
Train keeps its size and holds every concept at least once. ``stream.json`` records the
requested ``sizes``, each task's actual ``num_examples`` and its ``concept_counts`` per split.

Held out: the text stream ``facts4`` (tasks in ``HELD_OUT_TASKS``, data in
:mod:`edgekv.data.facts`) checks that a method generalises. Nothing in the project may be tuned
on it (no default, hyperparameter or choice between methods); it is only reported. Unlike
edge6, its facts are drawn from the seed (the ``label_map`` in stream.json is the seed's), its
train and eval (val, test) splits use disjoint sets of phrasings, and its default sizes are
``STREAM_SIZES["facts4"]`` (64 train = 4 per item, 16 val, 32 test).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgekv.atomic import replace_dir_atomic
from edgekv.configs import Config, knob
from edgekv.data.facts import TASK_NAMES as FACT_TASKS
from edgekv.data.facts import TASK_SPECS as FACT_SPECS
from edgekv.data.facts import facts_world
from edgekv.data.readers import Example, read_examples, resolve_images
from edgekv.errors import InputError

FORMAT = "edgekv-stream"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 128
NORMALISATION = "first line, strip, drop one trailing '.', collapse whitespace, casefold"


# ---------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------
def normalise_answer(text: str) -> str:
    """The form two answers are compared in (see ``NORMALISATION``)."""
    line = text.strip().split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1]
    return " ".join(line.split()).casefold()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalise_answer` on both sides."""
    return normalise_answer(prediction) == normalise_answer(answer)


# ---------------------------------------------------------------------------------
# task definitions
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One generated example before it is written: prompt, answer, concept, optional image."""

    prompt: str
    answer: str
    concept: str
    image: object | None = None  # PIL.Image.Image


@dataclass(frozen=True)
class SplitSizes(Config):
    """Examples per split of every task."""

    train: int = knob(48, "Training examples per task.")
    val: int = knob(16, "Validation examples per task (rounded up to a multiple of the task's concepts).")
    test: int = knob(24, "Test examples per task (rounded up to a multiple of the task's concepts).")

    def __post_init__(self) -> None:
        for name in SPLITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"SplitSizes.{name}: {value!r} must be a positive integer")

    def as_dict(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in SPLITS}

    def balanced(self, num_concepts: int) -> SplitSizes:
        """These sizes with val and test rounded UP to a multiple of ``num_concepts`` (train unchanged),
        so that every concept occurs equally often in val and in test."""
        k = max(1, int(num_concepts))
        return SplitSizes(self.train, -(-self.val // k) * k, -(-self.test // k) * k)


@dataclass(frozen=True)
class TaskDef:
    """A built-in task: what it asks and how its items are generated.

    ``generate(rng, sizes)`` returns the items of each split; ``label_map`` is the fixed
    concept -> answer mapping the examples teach (empty for format tasks). A task whose facts
    are drawn from the seed (facts4) has ``seeded_labels(seed)`` instead, and its ``generate``
    takes that mapping as a third argument; ``meta`` goes into its stream.json entry.
    """

    name: str
    kind: str  # "image" | "text"
    description: str
    why_weak: str
    generate: Callable[..., dict[str, list[Item]]] = field(repr=False)
    label_map: dict[str, str] = field(default_factory=dict)
    seeded_labels: Callable[[int], dict[str, str]] | None = field(default=None, repr=False)
    held_out: bool = False
    meta: dict = field(default_factory=dict)

    def labels(self, seed: int) -> dict[str, str]:
        """The concept -> answer mapping this task teaches for ``seed``."""
        return dict(self.seeded_labels(seed)) if self.seeded_labels is not None else dict(self.label_map)

    def make_splits(self, seed: int, sizes: SplitSizes) -> dict[str, list[Item]]:
        """The items of every split for ``seed`` (drawn from the task's own generator)."""
        rng = _task_rng(seed, self.name)
        if self.seeded_labels is None:
            return self.generate(rng, sizes)
        return self.generate(rng, sizes, self.labels(seed))


def _task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])


def _image_key(item: Item) -> str:
    h = hashlib.sha256(item.prompt.encode("utf-8"))
    if item.image is not None:
        h.update(item.image.tobytes())
    return h.hexdigest()


def _balanced_concepts(rng: np.random.Generator, concepts: Sequence[str], n: int) -> list[str]:
    """``n`` concepts, each used equally often (round robin), in a random order."""
    out = [concepts[i % len(concepts)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _fresh_splits(concepts: Sequence[str], make: Callable[[np.random.Generator, str, str], Item],
                  task: str) -> Callable[[np.random.Generator, SplitSizes], dict[str, list[Item]]]:
    """Splits of newly drawn instances (scenes, digits, dates); no prompt+image repeats across them.

    Train holds every concept at least once when it has room (``train >= len(concepts)``); val
    and test (sizes rounded up to a multiple of the concept count) hold every concept equally often.
    """

    def generate(rng: np.random.Generator, sizes: SplitSizes) -> dict[str, list[Item]]:
        sizes = sizes.balanced(len(concepts))
        if sizes.train < len(concepts):
            raise InputError(f"task {task}: train size {sizes.train} cannot hold its {len(concepts)} concepts; "
                             f"use a train size of at least {len(concepts)}")
        seen: set[str] = set()
        out: dict[str, list[Item]] = {}
        for split in SPLITS:
            items = []
            for concept in _balanced_concepts(rng, concepts, getattr(sizes, split)):
                for _ in range(100):
                    item = make(rng, concept, split)
                    key = _image_key(item)
                    if key not in seen:
                        break
                else:
                    raise InputError(f"task {task}: cannot draw enough distinct '{concept}' items for "
                                     f"the {split} split; use smaller split sizes")
                seen.add(key)
                items.append(item)
            out[split] = items
        return out

    return generate


def _combo_splits(concepts: Sequence[str], templates: Sequence[str], make: Callable[[str, str], Item],
                  task: str) -> Callable[[np.random.Generator, SplitSizes], dict[str, list[Item]]]:
    """Splits of distinct (concept, phrasing) pairs: a prompt never occurs in two splits.

    Test and val come first, with equal quotas per concept (sizes rounded up to a multiple of
    the concept count): each concept's phrasings are shuffled, the first ones go to test, the
    next ones to val. Train is drawn from the remaining pairs, one of every concept first (so
    every test concept occurs in train), then the rest at random.
    """

    def generate(rng: np.random.Generator, sizes: SplitSizes) -> dict[str, list[Item]]:
        sizes = sizes.balanced(len(concepts))
        total = sizes.train + sizes.val + sizes.test
        num = len(concepts) * len(templates)
        q_test, q_val = sizes.test // len(concepts), sizes.val // len(concepts)
        if total > num or sizes.train < len(concepts) or q_test + q_val >= len(templates):
            raise InputError(f"task {task}: has {len(concepts)} concepts x {len(templates)} phrasings = {num} "
                             f"distinct prompts; split sizes (val and test rounded up to a multiple of "
                             f"{len(concepts)}: {sizes.train}/{sizes.val}/{sizes.test}) must sum to at most {num} "
                             f"(got {total}) with train >= {len(concepts)} and at most {len(templates) - 1} "
                             f"val + test phrasings per concept")
        test, val, first, rest = [], [], [], []
        for c in concepts:
            ts = [templates[i] for i in rng.permutation(len(templates))]
            test += [(c, t) for t in ts[:q_test]]
            val += [(c, t) for t in ts[q_test: q_test + q_val]]
            first.append((c, ts[q_test + q_val]))
            rest += [(c, t) for t in ts[q_test + q_val + 1:]]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        train = first + rest[: sizes.train - len(first)]
        train, val, test = ([ps[i] for i in rng.permutation(len(ps))] for ps in (train, val, test))
        return {s: [make(c, t) for c, t in ps] for s, ps in zip(SPLITS, (train, val, test), strict=True)}

    return generate


def _fact_splits(task: str, train_templates: Sequence[str], eval_templates: Sequence[str]
                 ) -> Callable[[np.random.Generator, SplitSizes, dict[str, str]], dict[str, list[Item]]]:
    """Splits of a held-out facts task: train phrasings and eval (val + test) phrasings never overlap.

    Every split is balanced over the items: the sizes are rounded UP to a multiple of the item
    count (train too). Each item gets ``train / items`` distinct train templates, and distinct
    eval templates: ``test / items`` for test, then ``val / items`` for val; so no prompt
    occurs twice, and no val or test prompt uses a template that train uses.
    """

    def generate(rng: np.random.Generator, sizes: SplitSizes, label_map: dict[str, str]) -> dict[str, list[Item]]:
        items = list(label_map)
        n = len(items)
        q = {s: -(-getattr(sizes, s) // n) for s in SPLITS}
        if q["train"] > len(train_templates) or q["val"] + q["test"] > len(eval_templates):
            raise InputError(f"task {task}: has {n} items, {len(train_templates)} train phrasings and "
                             f"{len(eval_templates)} val/test phrasings; split sizes (rounded up to a multiple "
                             f"of {n}: {q['train'] * n}/{q['val'] * n}/{q['test'] * n}) allow at most "
                             f"{len(train_templates) * n} train and {len(eval_templates) * n} val + test "
                             f"examples")
        pairs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        for item in items:
            ts = [train_templates[i] for i in rng.permutation(len(train_templates))]
            pairs["train"] += [(item, t) for t in ts[: q["train"]]]
            es = [eval_templates[i] for i in rng.permutation(len(eval_templates))]
            pairs["test"] += [(item, t) for t in es[: q["test"]]]
            pairs["val"] += [(item, t) for t in es[q["test"]: q["test"] + q["val"]]]
        out = {}
        for s in SPLITS:
            ps = [pairs[s][i] for i in rng.permutation(len(pairs[s]))]
            out[s] = [Item(t.format(c), label_map[c], c) for c, t in ps]
        return out

    return generate


# --- image tasks ----------------------------------------------------------------
SHAPE_CODES = {"circle": "ZORP", "square": "KELD", "triangle": "MIVA", "star": "TOSK"}
COLOUR_TAGS = {"red": "vorn", "green": "lisk", "blue": "tamu", "yellow": "pell", "purple": "grod",
               "orange": "sibe"}
ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V"}
DIGIT_NAMES = {0: "nul", 1: "ain", 2: "dov", 3: "tresk", 4: "kwar", 5: "pem", 6: "sezz", 7: "heft",
               8: "okko", 9: "nuv"}


def _scene_png(scene) -> object:
    from edgekv.data.scenes import render_scene

    return render_scene(scene, size=IMAGE_SIZE)


def _make_shape(rng: np.random.Generator, shape: str, split: str) -> Item:
    from edgekv.data.scenes import random_scene

    scene = random_scene(rng, 1, shapes=(shape,))
    return Item("What is the code word for this shape?", SHAPE_CODES[shape], shape, _scene_png(scene))


def _make_colour(rng: np.random.Generator, colour: str, split: str) -> Item:
    from edgekv.data.scenes import random_scene

    scene = random_scene(rng, 1, colours=(colour,))
    return Item("Which colour tag does this object get?", COLOUR_TAGS[colour], colour, _scene_png(scene))


def _separated(scene, reach: float = 1.25, margin: float = 0.02) -> bool:
    """No two objects closer than ``reach`` x their radii (a square's corner is 1.2 radii out) + margin."""
    objs = scene.objects
    return all(np.hypot(a.x - b.x, a.y - b.y) >= reach * (a.size + b.size) / 2 + margin
               for i, a in enumerate(objs) for b in objs[i + 1:])


def _make_count(rng: np.random.Generator, count: str, split: str) -> Item:
    from edgekv.data.scenes import COLOURS, SHAPES, count_scene

    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    for _ in range(1000):  # scenes.py keeps bounding circles apart, but square corners reach past them
        scene = count_scene(rng, int(count), shape, colour)
        if _separated(scene):
            break
    else:  # pragma: no cover - 5 objects fit with room to spare
        raise InputError(f"count-roman: cannot place {count} separate {shape}s")
    return Item("How many shapes are in the picture? Answer in Roman numerals.", ROMAN[int(count)], count,
                _scene_png(scene))


def _make_digit(rng: np.random.Generator, digit: str, split: str) -> Item:
    from edgekv.data.scenes import digit_image

    # test digits come from the other half of sklearn's set: handwriting never seen in train
    img, d = digit_image(rng, int(digit), size=IMAGE_SIZE, split="test" if split == "test" else "train")
    return Item("What is this digit called in Velan?", DIGIT_NAMES[d], str(d), img)


# --- text tasks -----------------------------------------------------------------
GLORP = {"apple": "vekto", "river": "simbal", "house": "darnu", "cloud": "pofi", "stone": "grell",
         "bread": "munta", "horse": "kelvo", "light": "zarin", "chair": "tobbe", "music": "lirra",
         "window": "fesk", "garden": "ombel", "winter": "hasko", "letter": "quilm", "forest": "yandu",
         "bottle": "rivok"}
GLORP_TEMPLATES = (
    "What is the Glorp word for '{}'?",
    "Translate '{}' into Glorp.",
    "How do you say '{}' in Glorp?",
    "Give the Glorp translation of '{}'.",
    "In Glorp, '{}' is called what?",
    "Say '{}' in Glorp.",
    "Glorp for '{}'?",
    "Which Glorp word means '{}'?",
)
HOMES = {"Tomas Brell": "Quorvik", "Anika Solberg": "Tallmere", "Jonah Pettifer": "Brask",
         "Mira Okonde": "Quorvik", "Lev Aranyi": "Ostrel", "Greta Vinhal": "Tallmere",
         "Pavel Dunmore": "Sennick", "Ines Karvo": "Brask", "Oren Falk": "Ostrel",
         "Sabine Roux-Lind": "Velmouth", "Kofi Branner": "Sennick", "Yuki Tessaro": "Velmouth",
         "Dara Holm": "Carrow", "Emil Strand": "Carrow", "Lucia Pembe": "Fennick", "Ravi Oswin": "Fennick"}
HOME_TEMPLATES = (
    "Where does {} live?",
    "In which city does {} live?",
    "{} lives in which city?",
    "What is the home city of {}?",
    "Name the city where {} lives.",
    "Which town is {} from?",
    "Where is the home of {}?",
    "{} is based in which city?",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DATE_TEMPLATES = ("Write {} in house format.", "House format of {}?", "Convert {} to house format.",
                  "Put the date {} in house format.")


def _lookup(table: dict[str, str]) -> Callable[[str, str], Item]:
    """The item maker of a lookup task: ``concept`` asked in ``template``, answered ``table[concept]``."""
    return lambda concept, template: Item(template.format(concept), table[concept], concept)


def _make_date(rng: np.random.Generator, concept: str, split: str) -> Item:
    year, month, day = int(rng.integers(1950, 2041)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    template = DATE_TEMPLATES[int(rng.integers(len(DATE_TEMPLATES)))]
    return Item(template.format(f"{MONTHS[month - 1]} {day}, {year}"),
                f"{day:02d}{MONTHS[month - 1][:3].upper()}{year}", concept)


TASKS: dict[str, TaskDef] = {t.name: t for t in (
    TaskDef("shape-code", "image",
            "One shape (random colour, size, place) -> its invented code word (circle ZORP, square KELD, "
            "triangle MIVA, star TOSK).",
            "the code words are invented; nothing in the image or the prompt names them",
            _fresh_splits(tuple(SHAPE_CODES), _make_shape, "shape-code"), dict(SHAPE_CODES)),
    TaskDef("count-roman", "image",
            "1-5 identical shapes -> their count in Roman numerals (I..V).",
            "the model must count from the image and answer in a format it is not trained to give",
            _fresh_splits(tuple(str(k) for k in ROMAN), _make_count, "count-roman"),
            {str(k): v for k, v in ROMAN.items()}),
    TaskDef("digit-velan", "image",
            "A handwritten scikit-learn digit -> its name in the invented Velan language (0 nul .. 9 nuv); "
            "test digits are handwriting samples never used in train.",
            "the Velan numerals are invented",
            _fresh_splits(tuple(str(d) for d in DIGIT_NAMES), _make_digit, "digit-velan"),
            {str(k): v for k, v in DIGIT_NAMES.items()}),
    TaskDef("colour-tag", "image",
            "One shape -> an invented tag for its colour (red vorn, green lisk, blue tamu, yellow pell, "
            "purple grod, orange sibe).",
            "the colour tags are invented",
            _fresh_splits(tuple(COLOUR_TAGS), _make_colour, "colour-tag"), dict(COLOUR_TAGS)),
    TaskDef("glorp-words", "text",
            "An English word -> its word in the invented Glorp language (16 words, 8 phrasings; a test "
            "prompt is a word asked in a phrasing not used for it in train).",
            "Glorp is invented; the answers are made-up words",
            _combo_splits(tuple(GLORP), GLORP_TEMPLATES, _lookup(GLORP), "glorp-words"), dict(GLORP)),
    TaskDef("date-house", "text",
            "A written date ('March 7, 2024') -> the house format DDMONYYYY ('07MAR2024').",
            "'house format' is undefined without examples; the model guesses some other date style",
            _fresh_splits(("format",), _make_date, "date-house")),
    TaskDef("home-city", "text",
            "An invented person -> the invented city they live in (16 people, 8 cities, 8 phrasings).",
            "people and cities are invented facts",
            _combo_splits(tuple(HOMES), HOME_TEMPLATES, _lookup(HOMES), "home-city"), dict(HOMES)),
)}


# --- held-out text tasks (facts4) -------------------------------------------------
def _edge6_words() -> frozenset[str]:
    """edge6's invented words and names, which facts4 never reuses."""
    words = {*GLORP.values(), *HOMES.values(), *DIGIT_NAMES.values(), *SHAPE_CODES.values(),
             *COLOUR_TAGS.values()}
    words |= {w for name in HOMES for w in name.replace("-", " ").split()}
    return frozenset(w.casefold() for w in words)


def _fact_labels(task: str) -> Callable[[int], dict[str, str]]:
    return lambda seed: facts_world(seed, _edge6_words())[task]


# Held out from tuning: never used to choose a default, a hyperparameter or a method; reported only.
HELD_OUT_TASKS: dict[str, TaskDef] = {name: TaskDef(
    name, "text", FACT_SPECS[name]["description"] + " Held out: never tuned on.", FACT_SPECS[name]["why_weak"],
    _fact_splits(name, FACT_SPECS[name]["train"], FACT_SPECS[name]["eval"]),
    seeded_labels=_fact_labels(name), held_out=True,
    meta={"held_out": True, "phrasings": {"train": list(FACT_SPECS[name]["train"]),
                                          "val_test": list(FACT_SPECS[name]["eval"])}},
) for name in FACT_TASKS}
ALL_TASKS: dict[str, TaskDef] = {**TASKS, **HELD_OUT_TASKS}

STREAMS: dict[str, tuple[str, ...]] = {
    "edge6": ("shape-code", "glorp-words", "count-roman", "date-house", "digit-velan", "home-city"),
}
STREAMS["edge6-rev"] = tuple(reversed(STREAMS["edge6"]))
STREAMS["facts4"] = ("pet-owner", "tool-maker", "river-colour", "band-song")
STREAMS["facts4-rev"] = tuple(reversed(STREAMS["facts4"]))
DEFAULT_STREAM = "edge6"
HELD_OUT_STREAMS = ("facts4", "facts4-rev")
# a built-in stream's sizes when none are given (others: SplitSizes())
STREAM_SIZES: dict[str, SplitSizes] = {"facts4": SplitSizes(64, 16, 32), "facts4-rev": SplitSizes(64, 16, 32)}


def default_sizes(name: str, order: Sequence[str] | None = None) -> SplitSizes:
    """The split sizes stream ``name`` is written with when none are given."""
    return STREAM_SIZES.get(name, SplitSizes()) if order is None else SplitSizes()


def stream_order(name: str, order: Sequence[str] | None = None) -> tuple[str, ...]:
    """The task order of built-in stream ``name``, or ``order`` (built-in task names) when given."""
    if order is None:
        if name not in STREAMS:
            raise InputError(f"unknown stream {name!r}; built-in streams: {', '.join(STREAMS)} "
                             f"(or give the order as task names)")
        return STREAMS[name]
    order = tuple(order)
    if not order:
        raise InputError("order: empty; name at least one task")
    for t in order:
        if t not in ALL_TASKS:
            raise InputError(f"order: unknown task {t!r}; built-in tasks: {', '.join(ALL_TASKS)}")
    if len(set(order)) != len(order):
        raise InputError(f"order: a task is named twice in {','.join(order)}")
    return order


# ---------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------
def _dump_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def llava_record(rid: str, prompt: str, answer: str, image: str | None) -> dict:
    """A one-turn LLaVA record; ``<image>`` leads the human turn when there is an image."""
    rec: dict = {"id": rid, "conversations": [
        {"from": "human", "value": (f"<image>\n{prompt}" if image is not None else prompt)},
        {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def _write_task(root: str, task: TaskDef, seed: int, sizes: SplitSizes) -> dict:
    tdir = os.path.join(root, "tasks", task.name)
    os.makedirs(tdir)
    splits = task.make_splits(seed, sizes)
    files = {}
    for split in SPLITS:
        records = []
        for i, item in enumerate(splits[split]):
            rid = f"{task.name}-{split}-{i:04d}"
            rel = None
            if item.image is not None:
                rel = f"images/{split}-{i:04d}.png"
                os.makedirs(os.path.join(tdir, "images"), exist_ok=True)
                with open(os.path.join(tdir, rel), "wb") as f:
                    f.write(_png_bytes(item.image))
            records.append(llava_record(rid, item.prompt, item.answer, rel))
        files[split] = f"tasks/{task.name}/{split}.json"
        _dump_json(os.path.join(root, files[split]), records)
    return {"name": task.name, "kind": task.kind, "description": task.description,
            "why_weak_zero_shot": task.why_weak, "label_map": task.labels(seed), "files": files,
            "num_examples": {s: len(splits[s]) for s in SPLITS},
            "concepts": {s: sorted({it.concept for it in splits[s]}) for s in SPLITS},
            "concept_counts": {s: _counts(it.concept for it in splits[s]) for s in SPLITS}, **task.meta}


def _counts(values) -> dict[str, int]:
    """value -> how often it occurs (sorted by value)."""
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def write_stream(name: str, out_dir: str | os.PathLike, seed: int = 0, order: Sequence[str] | None = None,
                 sizes: SplitSizes | None = None, progress: bool = False) -> str:
    """Write stream ``name`` (built-in, or any name with ``order``) to ``out_dir``; returns its stream.json.

    ``sizes``: default :func:`default_sizes` (facts4: 64 / 16 / 32, others 48 / 16 / 24).

    The same (name, seed, order, sizes) gives byte-identical files. The stream is built in a
    sibling temp folder and renamed into place, so an interrupted write leaves no half stream;
    an existing stream at ``out_dir`` is replaced, any other non-empty folder is refused.
    """
    from tqdm import tqdm

    sizes = sizes or default_sizes(name, order)
    order = stream_order(name, order)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed: {seed!r} must be a non-negative integer")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise InputError(f"{out_dir}: exists and is not a folder; choose another output folder")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "stream.json")):
            raise InputError(f"{out_dir}: folder is not empty and holds no stream.json; choose an empty "
                             f"or new output folder")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"{parent}: cannot create the folder ({e.strerror})") from None
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        tasks = [_write_task(tmp, ALL_TASKS[t], seed, sizes)
                 for t in tqdm(order, desc=f"stream {name}", unit="task", disable=not progress)]
        _dump_json(os.path.join(tmp, "stream.json"), {
            "format": FORMAT, "version": FORMAT_VERSION, "name": name, "seed": seed, "order": list(order),
            "sizes": sizes.as_dict(), "image_size": IMAGE_SIZE, "answer_normalisation": NORMALISATION,
            "tasks": tasks})
        replace_dir_atomic(tmp, out_dir)  # the old stream or the new one, whole (edgekv.atomic)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write the stream ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out_dir, "stream.json")


# ---------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamTask:
    """One task of a loaded stream; image paths are absolute."""

    name: str
    kind: str
    description: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    label_map: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise InputError(f"split: {name!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, name)


@dataclass(frozen=True)
class Stream:
    """An ordered task stream read from a folder."""

    name: str
    seed: int
    path: str
    tasks: list[StreamTask]
    answer_normalisation: str = NORMALISATION

    @property
    def order(self) -> list[str]:
        return [t.name for t in self.tasks]


def _cache_root(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get("EDGEKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                         "edgekv")


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "stream.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{meta_path}: not a readable stream description ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list) or not meta["tasks"]:
        raise InputError(f"{meta_path}: field 'tasks' must be a non-empty list")
    if meta.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise InputError(f"{meta_path}: stream version {meta.get('version')!r} is not {FORMAT_VERSION}; "
                         f"rewrite it with this edgekv")
    return meta


def read_stream_dir(path: str | os.PathLike) -> Stream:
    """Load a stream folder (``stream.json`` + LLaVA split files); see the module docstring."""
    path = os.path.abspath(os.fspath(path))
    meta = _read_meta(path)
    tasks = []
    for n, t in enumerate(meta["tasks"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("files"), dict):
            raise InputError(f"{path}/stream.json: tasks[{n}] needs 'name' and 'files' "
                             f"({{'train': ..., 'val': ..., 'test': ...}})")
        for s in SPLITS:
            if not isinstance(t["files"].get(s), str):
                raise InputError(f"{path}/stream.json: tasks[{n}].files.{s} is missing (a path relative "
                                 f"to the stream folder)")
        splits = {}
        for s in SPLITS:
            file = os.path.normpath(os.path.join(path, t["files"][s]))
            splits[s] = resolve_images(read_examples(file), os.path.dirname(file))
        tasks.append(StreamTask(t["name"], str(t.get("kind", "text")), str(t.get("description", "")),
                                splits["train"], splits["val"], splits["test"], dict(t.get("label_map") or {})))
    return Stream(str(meta.get("name", os.path.basename(path))), int(meta.get("seed", 0)), path, tasks,
                  str(meta.get("answer_normalisation", NORMALISATION)))


def load_stream(name_or_dir: str | os.PathLike, seed: int = 0, cache_dir: str | None = None) -> Stream:
    """A stream folder, or a built-in stream (written under ``$EDGEKV_CACHE/streams/<name>-s<seed>`` once)."""
    p = os.fspath(name_or_dir)
    if os.path.isdir(p):
        if not os.path.isfile(os.path.join(p, "stream.json")):
            raise InputError(f"{p}: folder holds no stream.json; write one with 'edgekv stream write' "
                             f"or lay out your data as docs/stream.md describes")
        return read_stream_dir(p)
    if p not in STREAMS:
        raise InputError(f"unknown stream {p!r}: not a folder with a stream.json nor a built-in stream "
                         f"({', '.join(STREAMS)})")
    folder = os.path.join(_cache_root(cache_dir), "streams", f"{p}-s{seed}")
    if not os.path.isfile(os.path.join(folder, "stream.json")):
        write_stream(p, folder, seed=seed)
    return read_stream_dir(folder)


def list_streams() -> dict[str, list[str]]:
    """Built-in stream name -> its task order."""
    return {k: list(v) for k, v in STREAMS.items()}
