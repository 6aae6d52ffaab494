"""Varied English sentences composed from word lists, so the corpus needs no downloaded text.

Every sentence is a pure function of ``(salt, index)``: the corpus and the tests draw from
disjoint salts, so "fresh sentences" in tests never occur in the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

SUBJECTS = [
    "the old fisherman",
    "my neighbour",
    "a tired engineer",
    "the young teacher",
    "our new manager",
    "the quiet student",
    "a local farmer",
    "the bus driver",
    "my grandmother",
    "the city council",
    "a famous painter",
    "the night nurse",
    "her little brother",
    "the museum guide",
    "a lost tourist",
    "the baker on the corner",
    "every volunteer",
    "the radio host",
    "a curious child",
    "the chess champion",
    "the head gardener",
    "our football coach",
    "the ship's captain",
    "a travelling musician",
    "the librarian",
]
VERBS = [
    "carried",
    "painted",
    "repaired",
    "described",
    "ordered",
    "discovered",
    "borrowed",
    "delivered",
    "photographed",
    "counted",
    "cleaned",
    "explained",
    "forgot",
    "measured",
    "sold",
    "collected",
    "returned",
    "noticed",
    "planted",
    "cooked",
    "studied",
    "wrapped",
    "checked",
    "ignored",
    "moved",
]
OBJECTS = [
    "a basket of green apples",
    "the broken bicycle",
    "seven wooden chairs",
    "an old map of the coast",
    "the heavy winter coats",
    "a letter from Canada",
    "the yellow umbrella",
    "two bottles of milk",
    "the silver pocket watch",
    "a box of crayons",
    "the kitchen window",
    "twelve paper lanterns",
    "the blue notebook",
    "a bag of warm bread",
    "the garden fence",
    "three tickets to the concert",
    "the long wooden table",
    "an envelope full of photographs",
    "the red telephone",
    "a jar of honey",
]
PLACES = [
    "near the harbour",
    "behind the station",
    "in the back garden",
    "at the village market",
    "on the top floor",
    "beside the river",
    "in a crowded cafe",
    "under the railway bridge",
    "at the end of the street",
    "inside the old church",
    "on the northern hills",
    "by the school gate",
]
TIMES = [
    "before breakfast",
    "late last night",
    "on Sunday morning",
    "during the storm",
    "after the meeting",
    "in the spring of nineteen ninety",
    "at half past four",
    "every other Thursday",
    "just before dawn",
    "while it was snowing",
    "at the start of the holidays",
    "three weeks ago",
]
ADVERBS = ["carefully", "quickly", "without a word", "with great pride", "rather slowly", "once again"]
OPENERS = ["Honestly,", "Surprisingly,", "As usual,", "By the way,", "In the end,", "Strangely enough,"]
QUESTIONS = [
    "Did {s} really say that {o} was {p}?",
    "Why would {s} leave {o} {p} {t}?",
    "Who told {s} about {o}?",
    "Can you believe that {s} {v} {o} {t}?",
]
STATEMENTS = [
    "{s} waited.",
    "{O} {s} {v} it.",
    "Look {p}!",
    "{s} {v} {o}.",
    "Not {t}, please.",
    "{n} of them, {a}.",
    "{s} {v} {o} {p}.",
    "{s} {v} {o} {t}.",
    "{O} {s} {v} {o} {a} {p} {t}.",
    "{t}, {s} {v} {o}.",
    "{s} {v} {o} {a}, and then walked home {p}.",
    "When {s} arrived {p}, nobody had {v} {o} yet.",
    "{s} {v} {o}; it took {n} minutes {t}.",
    "The number was {n}, so {s} {v} {o} {a}.",
    "{s} {v} {o} {p}, and {s2} {v2} {o2} {t}.",
]
NUMBERS = [
    "two",
    "five",
    "eleven",
    "twenty",
    "thirty seven",
    "forty two",
    "sixty",
    "ninety nine",
    "a hundred",
]


def sentence(index: int, salt: str = "corpus") -> str:
    """The ``index``-th sentence of the stream ``salt``; 2 to about 30 words."""
    rng = random.Random(f"{salt}:{index}")
    pattern = rng.choice(QUESTIONS if rng.random() < 0.2 else STATEMENTS)
    text = pattern.format(
        s=rng.choice(SUBJECTS),
        s2=rng.choice(SUBJECTS),
        v=rng.choice(VERBS),
        v2=rng.choice(VERBS),
        o=rng.choice(OBJECTS),
        o2=rng.choice(OBJECTS),
        p=rng.choice(PLACES),
        t=rng.choice(TIMES),
        a=rng.choice(ADVERBS),
        O=rng.choice(OPENERS),
        n=rng.choice(NUMBERS),
    )
    return text[0].upper() + text[1:]


def sentences(count: int, salt: str = "corpus", exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct sentences of the stream ``salt``, none of them in ``exclude``."""
    excluded = set(exclude)
    seen: dict[str, None] = {}
    i = 0
    while len(seen) < count:
        text = sentence(i, salt)
        if text not in excluded:
            seen.setdefault(text, None)
        i += 1
    return list(seen)
