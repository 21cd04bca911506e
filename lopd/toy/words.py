"""Dictionary-completion world: a task where on-policy distillation has something to teach.

A prompt is a short prefix of a word from a fixed dictionary of random words ("qa="); any dictionary word
that starts with the prefix is a valid answer, written as the remaining letters ("zt<eos>"). A teacher that
memorised the dictionary spreads its probability over every valid completion, so its distribution carries
information beyond a one-hot label; a smaller student cannot cover the whole dictionary and must choose
where to put its mass. Reverse KL on the student's own rollouts (mode seeking) helps there, where more SFT
on teacher samples does not (see ../shared/reference/environment.md, "third world").

Digit arithmetic was rejected for the demo: its teacher is near-deterministic, so OPD reduces to SFT.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Iterable

from lopd.toy import ASSETS
from lopd.toy.splits import Prompt, write_prompts_jsonl  # noqa: F401  (re-exported)
from lopd.verifier import rubric_score

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SEPARATOR = "="
DICTIONARY_FILE = ASSETS / "words.txt"

# Fixed seeds so the dictionary and every prompt split are reproducible on any machine.
DICTIONARY_SEED = 1234
SPLIT_SEEDS = {"teacher": 11, "sft": 22, "opd": 33, "eval": 44, "test": 55}


def make_dictionary(size: int = 800, seed: int = DICTIONARY_SEED, min_len: int = 4, max_len: int = 7) -> list[str]:
    """Random letter strings, unique and sorted; the whole 'knowledge' the teacher must memorise."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        length = rng.randint(min_len, max_len)
        words.add("".join(rng.choice(LETTERS) for _ in range(length)))
    return sorted(words)


@lru_cache(maxsize=1)
def dictionary() -> frozenset[str]:
    return frozenset(DICTIONARY_FILE.read_text().split())


def make_prompts(split: str, n: int, words: Iterable[str] | None = None, max_prefix: int = 2) -> list[Prompt]:
    """`n` prefixes cut from random dictionary words, 1..max_prefix letters, deterministic per split."""
    vocab = sorted(words if words is not None else dictionary())
    rng = random.Random(SPLIT_SEEDS[split])
    prompts = []
    for i in range(n):
        word = rng.choice(vocab)
        cut = rng.randint(1, max_prefix)
        prompts.append(Prompt(id=f"{split}-{i}", prompt=word[:cut] + SEPARATOR, answer=word[cut:]))
    return prompts


def completed_word(prompt: str, response: str) -> str:
    return prompt.rstrip(SEPARATOR) + response.strip()


def verify(prompt: dict, response: str) -> float:
    """Outcome reward: 1.0 when prefix + completion is a dictionary word, else 0.0."""
    return float(completed_word(prompt["prompt"], response) in dictionary())


# Rubric items (name, weight) of the rule-based judge: ROPD (arXiv 2605.07396) turns weighted items met into a reward.
RUBRIC = (("dictionary_word", 3.0), ("letters_only", 1.0), ("dictionary_length", 1.0))


def rubric(prompt: dict, response: str) -> dict[str, bool]:
    """Which rubric items a completion meets: a dictionary word, only letters, a length the dictionary uses (4-7)."""
    word = completed_word(prompt["prompt"], response)
    return {
        "dictionary_word": word in dictionary(),
        "letters_only": bool(response.strip()) and all(ch in LETTERS for ch in response.strip()),
        "dictionary_length": 4 <= len(word) <= 7,
    }


def judge(prompt: dict, response: str) -> float:
    """Rule-based rubric judge (`lopd rollout --judge lopd.toy.words:judge`): weighted score in [0, 1]."""
    return rubric_score(rubric(prompt, response), RUBRIC)
