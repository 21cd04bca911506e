"""A minimal math verifier for `pipelines/qwen3_gpu.toml`: the last `\\boxed{...}` must equal the reference answer.

Comparison is exact after removing whitespace, `$` and a trailing period, so equivalent forms (`0.5` vs
`\\frac{1}{2}`) count as wrong; for reported numbers use a symbolic checker (e.g. math-verify) as the verifier.
"""
from __future__ import annotations

BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if there is none or it is unclosed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def normalise(answer: str) -> str:
    return "".join(answer.split()).replace("$", "").rstrip(".")


def verify(row: dict, response: str) -> float:
    boxed = last_boxed(response)
    if boxed is None or row.get("answer") is None:
        return 0.0
    return float(normalise(boxed) == normalise(str(row["answer"])))
