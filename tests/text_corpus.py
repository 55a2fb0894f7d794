"""Small English text for the tests that prepare a real tokenizer and export or score a model."""

from __future__ import annotations

import random


def corpus_text(documents: int = 400, seed: int = 0) -> str:
    """Small English documents with regularities a tiny model picks up in a few steps."""
    rng = random.Random(seed)
    animals = {"cat": "drinks milk", "dog": "chases the ball", "bird": "sings a song", "horse": "eats hay"}
    colours = ["brown", "black", "white", "small", "old"]
    docs = []
    for i in range(documents):
        lines = []
        for _ in range(rng.randint(2, 4)):
            animal = rng.choice(list(animals))
            lines.append(f"The {rng.choice(colours)} {animal} {animals[animal]} in the {rng.choice(['garden', 'barn', 'house'])}.")
        docs.append(f"Story {i}: " + " ".join(lines))
    return "\n\n".join(docs) + "\n"


def fox_text(documents: int) -> str:
    """Documents about a quick brown fox: the task files of tests/test_tasks.py ask about it."""
    return "\n\n".join(f"Document {i}: the {'quick brown fox ' * (i % 7 + 3)}jumps over "
                       f"{i * 7} lazy dogs." for i in range(documents)) + "\n"
