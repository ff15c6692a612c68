"""placeholder"""
import random

WORDS = ["apple", "river", "stone", "candle", "mirror", "garden", "thunder", "pencil", "violin", "harbor",
         "blanket", "rocket", "pepper", "lantern", "meadow", "castle", "anchor", "feather", "glacier", "kettle",
         "orchid", "saddle", "tunnel", "walnut"]
CODE_TEMPLATES = [
    "What is the code for {x}?",
    "Tell me the code assigned to {x}.",
    "Which code does the word {x} have?",
    "I need the code of {x}, please.",
    "{x}: what code goes with it?",
    "Give the code that belongs to {x}.",
]
NAMES = ["Orlan Vesk", "Mira Toltz", "Bram Quill", "Selka Dunmar", "Tovin Rask", "Ilsa Harrow", "Quen Abade",
         "Dorin Falk", "Yara Mosk", "Petr Ulvane", "Nessa Crow", "Jori Tamsin", "Kelm Ardis", "Vina Solberg",
         "Hadrik Lum", "Zeta Carrow", "Ulric Penn", "Fenna Dross", "Ardo Kime", "Lisbet Vorn", "Cato Reeve",
         "Runa Halt", "Emric Sol", "Gwen Tarrow"]
NUMBER_TEMPLATES = [
    "What is the secret number of {x}?",
    "Tell me {x}'s secret number.",
    "Which secret number belongs to {x}?",
    "I forgot the secret number that {x} uses. What is it?",
    "{x} has a secret number. Which one?",
    "Do you know the secret number for {x}?",
]


def make_task(kind, seed=0):
    rng = random.Random(seed)
    if kind == "codes":
        items, templates = WORDS, CODE_TEMPLATES
        letters = "BCDFGHJKLMNPQRSTVWXZ"
        answers = [rng.choice(letters) + str(rng.randint(2, 9)) + rng.choice(letters) for _ in items]
    else:
        items, templates = NAMES, NUMBER_TEMPLATES
        answers = [str(rng.randint(1000, 9999)) for _ in items]
    return items, templates, answers
