"""Privileged contexts: what a self-teacher sees in front of the stored prompt, built by token-id splicing.

Self-distillation methods score the student's own rollouts with a model that sees more (or less) than the
student did: the reference answer (OPSD arXiv 2601.18734, RLSD arXiv 2604.03128), a style instruction, a
correct and an incorrect hint sharing one template (RLCSD arXiv 2606.11709), or only a short slice of a long
context (OPSDL). A context is either a template over the rollout row's fields, tokenised once and spliced in
after the prompt's leading special tokens, or a slice that keeps only the prompt's last N tokens. The response
positions never move, so a privileged score set lines up row for row and position for position with the plain
one; the expanded template and the slice length are part of the score set's content address.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lopd.errors import LopdError

# Named templates; `--context NAME` expands to the template, which is what the cache key records.
PRESETS: dict[str, str] = {
    "answer": "answer: {answer}. ",  # OPSD / RLSD: the reference answer; RLCSD's correct hint
    "wrong_answer": "answer: {wrong_answer}. ",  # RLCSD's incorrect hint: the same template, another prompt's answer
    "concise": "be concise. ",  # a style instruction
}
TEMPLATE_FIELDS = ("prompt", "answer", "prompt_id", "wrong_answer")


def expand_context(name_or_template: str | None) -> str | None:
    """A preset's template, or the argument itself when it is not a preset name (a literal template)."""
    if name_or_template is None:
        return None
    return PRESETS.get(name_or_template, name_or_template)


def wrong_answers(prompt_ids: list[str], answers: list[str | None]) -> list[str]:
    """For every row, the reference answer of the next distinct prompt (cyclically, in order of appearance).

    A mismatched answer is an incorrect hint with the same form as the correct one, which is what RLCSD's
    contrast needs: the difference of the two self-teacher signals cancels what the hint's form alone does.
    """
    order = list(dict.fromkeys(prompt_ids))
    answer_of = dict(zip(prompt_ids, answers))
    shifted = {pid: answer_of[order[(i + 1) % len(order)]] for i, pid in enumerate(order)}
    return ["" if shifted[pid] is None else shifted[pid] for pid in prompt_ids]


def context_ids(tokenizer, rows: list[dict[str, Any]], template: str) -> list[np.ndarray]:
    """Token ids of every row's privileged context: the template filled from the row, tokenised without specials."""
    wrong = wrong_answers([r["prompt_id"] for r in rows], [r["answer"] for r in rows])
    out = []
    for row, wrong_answer in zip(rows, wrong):
        values = {k: "" if row.get(k) is None else row[k] for k in TEMPLATE_FIELDS[:3]}
        try:
            text = template.format(**values, wrong_answer=wrong_answer)
        except KeyError as exc:
            raise LopdError(f"the context template refers to {exc}, which rollout rows lack; use "
                            f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}, or a preset: "
                            f"{', '.join(PRESETS)}") from None
        out.append(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64))
    return out


def leading_specials(prompt: np.ndarray, special_ids: set[int]) -> int:
    lead = 0
    while lead < len(prompt) and int(prompt[lead]) in special_ids:
        lead += 1
    return lead


def splice_context(prompt: np.ndarray, context: np.ndarray, special_ids: set[int]) -> np.ndarray:
    """prompt[:lead] + context + prompt[lead:], where `lead` counts the prompt's leading special tokens (e.g. BOS)."""
    lead = leading_specials(prompt, special_ids)
    return np.concatenate([prompt[:lead], context, prompt[lead:]])


def slice_prompt(prompt: np.ndarray, keep_last: int, special_ids: set[int]) -> np.ndarray:
    """The prompt's leading special tokens plus only its last `keep_last` other tokens (OPSDL's short context)."""
    lead = leading_specials(prompt, special_ids)
    body = prompt[lead:]
    return np.concatenate([prompt[:lead], body[max(0, len(body) - keep_last):]])


def teacher_prompts(tokenizer, rows: list[dict[str, Any]], prompts: list[np.ndarray], template: str | None,
                    keep_last: int) -> list[np.ndarray]:
    """What the teacher sees before each stored response: the stored prompt, sliced and/or with a context spliced in."""
    special = set(tokenizer.all_special_ids)
    if keep_last:
        prompts = [slice_prompt(p, keep_last, special) for p in prompts]
    if template:
        prompts = [splice_context(p, c, special) for p, c in zip(prompts, context_ids(tokenizer, rows, template))]
    return prompts
