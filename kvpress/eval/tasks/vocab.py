"""Random names and values for needles: word-pair keys, 7-digit numbers, UUIDs and variable names.

Everything draws from a caller-owned ``random.Random`` so samples are reproducible from a seed.
"""
from __future__ import annotations

import random
import string
import uuid
from typing import Callable

from kvpress.eval.tasks.haystack import corpus_words

_MAX_DRAWS_PER_VALUE = 1000

ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "narrow", "olive", "proud", "quiet", "rusty", "silent", "tidy", "upbeat", "vivid", "witty",
    "young", "zesty", "bold", "crimson", "distant", "frosty", "golden", "humble", "lively", "misty", "noble",
    "polite", "rapid", "scarlet", "sturdy", "velvet", "wild",
)
NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jaguar",
    "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quarry", "river", "saddle", "tulip",
    "umbrella", "valley", "walrus", "yacht", "zeppelin", "biscuit", "compass", "drum", "feather", "glacier",
    "hammock", "lagoon", "mitten", "otter", "pine", "robin", "sparrow", "thistle", "violin", "willow",
)


def word_key(rng: random.Random) -> str:
    """A hyphenated adjective-noun key such as ``misty-harbor`` (1,600 possibilities)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def seven_digit_number(rng: random.Random) -> str:
    """A number from 1000000 to 9999999 as text; the haystack holds no run of 5+ digits to collide with."""
    return str(rng.randint(1_000_000, 9_999_999))


def five_digit_number(rng: random.Random) -> str:
    """A number from 10000 to 99999 as text."""
    return str(rng.randint(10_000, 99_999))


def random_uuid(rng: random.Random) -> str:
    """A version-4 style UUID string drawn from ``rng`` (not from the OS entropy pool)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def variable_name(rng: random.Random) -> str:
    """Five random capital letters that never occur as a word of the haystack."""
    haystack_words = corpus_words()
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in haystack_words:
            return name


def distinct(draw: Callable[[random.Random], str], rng: random.Random, count: int) -> list[str]:
    """``count`` different values from ``draw(rng)``, in draw order; raises ValueError if ``count`` < 1."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    values: list[str] = []
    for _ in range(_MAX_DRAWS_PER_VALUE * count):
        value = draw(rng)
        if value not in values:
            values.append(value)
            if len(values) == count:
                return values
    raise ValueError(f"could not draw {count} distinct values; ask for fewer")
