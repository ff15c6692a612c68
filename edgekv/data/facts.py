"""The invented facts of the held-out text stream ``facts4`` (see docs/stream.md).

``facts4`` checks that a method generalises: it was written before any method tuning, and
nothing in the project may ever be tuned on it (no default, no hyperparameter, no choice
between methods); it is only reported. Its four tasks each teach 16 invented facts
(an invented person's pet, a tool's workshop, a river's colour, a band's best-known song).

Everything here is data; :mod:`edgekv.data.stream` turns it into tasks. For a seed,
:func:`facts_world` draws every item and answer of the four tasks from one generator, with a
small syllable generator, so that no name is shared by two tasks (or by an item and an
answer), no name contains another (nor a reserved word), none is a common word or name of these shapes
(``BLOCKED``) and none is a ``reserved`` word (the stream passes edge6's invented words).
Answers are unique within a task, so the answer names the item
(``edgekv.bench.ladder.example_concept``).

Phrasings: every task has six TRAIN templates and four EVAL templates (val and test). The
eval templates are built differently (a longer sentence with a distracting clause, the item
named later in the sentence, other verbs and nouns: "looks after", "workshop's stamp",
"shade", "tune"), and no eval template is a train template, so a test prompt is a known fact
asked in a way never seen in train.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

ITEMS_PER_TASK = 16
TASK_NAMES = ("pet-owner", "tool-maker", "river-colour", "band-song")

# --- the syllable generator ---------------------------------------------------------
CONSONANTS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
FINALS = ("k", "z", "sk")  # English has almost no words of these shapes ending so
# real words and well-known names of the generated shapes (CVCV+final, CVCVCV+final); "-ez" is
# never generated (Spanish surnames: Lopez, Perez, Gomez, ...)
BLOCKED = frozenset({
    "topaz", "kapok", "batik", "kopek", "damask", "basilisk", "tamarisk", "kazak", "kodak", "dalek",
    "malik", "tarik", "novak", "babak", "marek", "radek", "pamuk", "barak", "sumak", "tomek", "deniz",
    "kubik", "sadik", "rubik", "pavek", "mosk", "kiosk", "minsk", "tomsk", "pinsk", "musik", "tonik",
    "logik", "magik", "panik", "kinesk", "bolek", "lolek", "tobruk", "nanuk", "kayak", "dubak",
})


def _syllable(rng: np.random.Generator) -> str:
    return CONSONANTS[int(rng.integers(len(CONSONANTS)))] + VOWELS[int(rng.integers(len(VOWELS)))]


def invented_word(rng: np.random.Generator, syllables: int) -> str:
    """``syllables`` consonant+vowel syllables and a final k / z / sk (lowercase), never ending in -ez."""
    while True:
        stem = "".join(_syllable(rng) for _ in range(syllables))
        final = FINALS[int(rng.integers(len(FINALS)))]
        if not (stem.endswith("e") and final == "z"):
            return stem + final


# --- the four tasks -------------------------------------------------------------------
# Each task: how an item is named (a format of one or two invented words: "short" = 2
# syllables, "long" = 3), how an answer is named, and the templates. In a template "{}" is the
# item as named.
TASK_SPECS: dict[str, dict] = {
    "pet-owner": {
        "description": "An invented person -> the invented name of their pet (16 people).",
        "why_weak": "people and pets are invented facts",
        "item": ("short", "long"),  # first name + surname, capitalised
        "answer": "short", "answer_case": "title",
        "train": (
            "What is the name of {}'s pet?",
            "{} owns a pet. What is its name?",
            "What is {}'s pet called?",
            "Name the pet that belongs to {}.",
            "{} has a pet. What is the pet's name?",
            "Which pet does {} own?",
        ),
        "eval": (
            "After a long week at work, {} came home to feed the animal that lives in the house. "
            "What is that animal called?",
            "Every morning one small animal waits at the door for the person who looks after it, {}. "
            "Give the animal's name.",
            "Tell me what the animal cared for by {} is called.",
            "The neighbours often see a little animal following {} around the park. "
            "By what name does it go?",
        ),
    },
    "tool-maker": {
        "description": "An invented tool -> the invented workshop that makes it (16 tools).",
        "why_weak": "tools and workshops are invented facts",
        "item": ("long",), "item_case": "lower",
        "answer": "short", "answer_case": "title",
        "train": (
            "Which workshop makes the {}?",
            "Who makes the {}?",
            "The {} is made by which workshop?",
            "Name the workshop that makes the {}.",
            "What workshop builds the {}?",
            "Where is the {} made?",
        ),
        "eval": (
            "A carpenter bought a new {} last spring because her old one had cracked. "
            "From which workshop did it come?",
            "Every {} sold at the market carries its maker's stamp. "
            "Whose stamp is it, the stamp of which workshop?",
            "I need a spare part from the people who manufacture the {}. What is their workshop called?",
            "Tell me the workshop that produces the tool known as the {}.",
        ),
    },
    "river-colour": {
        "description": "An invented river -> the invented name of its colour (16 rivers).",
        "why_weak": "rivers and colour names are invented facts",
        "item": ("long",), "item_case": "title",
        "answer": "short", "answer_case": "lower",
        "train": (
            "What colour is the {} river?",
            "The {} river has which colour?",
            "Name the colour of the {} river.",
            "Which colour is the water of the {} river?",
            "The water of the {} river is what colour?",
            "What is the colour of the {} river?",
        ),
        "eval": (
            "Travellers who cross by ferry always remark on the water of the {} river. "
            "Which shade do they see?",
            "Painters who sit on its banks mix one special paint to match the {} river. "
            "Which hue do they mix?",
            "Tell me the shade of the water that flows in the river called {}.",
            "If you dipped a cup into the {} river, what shade would the water in the cup be?",
        ),
    },
    "band-song": {
        "description": "An invented band -> the invented title of its best-known song (16 bands).",
        "why_weak": "bands and songs are invented facts",
        "item": ("long",), "item_case": "title",
        "answer": "short", "answer_case": "title",
        "train": (
            "What is the best-known song by {}?",
            "{} is famous for which song?",
            "Name the most famous song by {}.",
            "Which song is {} best known for?",
            "What is {}'s biggest hit?",
            "The band {} is best known for what song?",
        ),
        "eval": (
            "At every concert the crowd waits all night for one tune from the group {}. "
            "Which tune is it?",
            "A radio host once introduced the best-loved track of the group {}. "
            "What was the title of that track?",
            "Tell me the title of the hit record made by the group called {}.",
            "Years after they split up, people still hum one tune by {}. What is the tune called?",
        ),
    },
}

_SYLLABLES = {"short": 2, "long": 3}


def _case(word: str, case: str) -> str:
    return word.capitalize() if case == "title" else word


@functools.lru_cache(maxsize=32)
def _world(seed: int, reserved: frozenset[str]) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    rng = np.random.default_rng([int(seed), zlib.crc32(b"facts4")])
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = invented_word(rng, syllables)
            if w in BLOCKED or any(w in u or u in w for u in used | reserved):
                continue
            used.add(w)
            return w

    out = []
    for task in TASK_NAMES:
        spec = TASK_SPECS[task]
        pairs = []
        for _ in range(ITEMS_PER_TASK):
            item = " ".join(_case(fresh(_SYLLABLES[part]), spec.get("item_case", "title")) for part in spec["item"])
            answer = _case(fresh(_SYLLABLES[spec["answer"]]), spec["answer_case"])
            pairs.append((item, answer))
        out.append((task, tuple(pairs)))
    return tuple(out)


def facts_world(seed: int, reserved: frozenset[str] | set[str] = frozenset()) -> dict[str, dict[str, str]]:
    """Task -> {item: answer} (16 items each, in drawing order) for ``seed``; a fresh copy.

    ``reserved``: words (any case) never to use, e.g. another stream's invented words."""
    words = frozenset(w.casefold() for w in reserved)
    return {task: dict(pairs) for task, pairs in _world(int(seed), words)}
