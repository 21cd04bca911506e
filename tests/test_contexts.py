"""Privileged-context transforms (lopd.contexts) on token ids, without an engine."""
from __future__ import annotations

import numpy as np
import pytest

from lopd.contexts import PRESETS, context_ids, expand_context, slice_prompt, splice_context, teacher_prompts, wrong_answers
from lopd.errors import LopdError
from lopd.score import ScoreConfig
from lopd.toy import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


ROWS = [
    {"prompt_id": "a", "prompt": "qa=", "answer": "zt"},
    {"prompt_id": "a", "prompt": "qa=", "answer": "zt"},
    {"prompt_id": "b", "prompt": "x=", "answer": "yyy"},
    {"prompt_id": "c", "prompt": "mo=", "answer": None},
]


def test_wrong_answer_is_the_next_prompts_answer_cyclically():
    assert wrong_answers([r["prompt_id"] for r in ROWS], [r["answer"] for r in ROWS]) == ["yyy", "yyy", "", "zt"]


def test_presets_expand_and_templates_pass_through():
    assert expand_context("answer") == PRESETS["answer"] and expand_context("{answer}|") == "{answer}|"
    assert expand_context(None) is None
    assert ScoreConfig(context="wrong_answer").context == PRESETS["wrong_answer"]
    # The correct and incorrect hints share their template: only the filled-in answer differs.
    assert PRESETS["answer"].replace("{answer}", "") == PRESETS["wrong_answer"].replace("{wrong_answer}", "")


def test_context_ids_fill_the_template_from_each_row(tok):
    ids = context_ids(tok, ROWS, PRESETS["wrong_answer"])
    assert [tok.decode(i) for i in ids] == ["answer: yyy. ", "answer: yyy. ", "answer: . ", "answer: zt. "]
    with pytest.raises(LopdError, match="refers to 'reward'"):
        context_ids(tok, ROWS, "{reward}")


def test_splice_and_slice_keep_leading_special_tokens():
    bos, prompt = 1, np.array([1, 10, 11, 12, 13])
    assert splice_context(prompt, np.array([7, 8]), {bos}).tolist() == [1, 7, 8, 10, 11, 12, 13]
    assert slice_prompt(prompt, 2, {bos}).tolist() == [1, 12, 13]
    assert slice_prompt(prompt, 99, {bos}).tolist() == prompt.tolist()


def test_teacher_prompts_slice_first_then_splice(tok):
    prompts = [np.asarray(tok(r["prompt"])["input_ids"]) for r in ROWS]
    out = teacher_prompts(tok, ROWS, prompts, "{answer}:", keep_last=1)
    assert tok.decode(out[2], skip_special_tokens=True) == "yyy:="
    assert out[2][0] == tok.bos_token_id


def test_negative_slice_is_refused():
    with pytest.raises(LopdError, match="--context-slice must be at least 0"):
        ScoreConfig(context_slice=-1).validate()
