"""Prompt sources (JSON Lines, Parquet, CSV, `datasets`), field mapping, chat templates, and their one-line errors.

Only the last test starts an engine (one, on a chat-templated copy of the toy student).
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopd.errors import LopdError
from lopd.fingerprint import digest_json
from lopd.models.loading import load_tokenizer
from lopd.prompts import PromptFormat, load_prompts
from lopd.rollout import SamplingConfig, encode_prompts, rollout, rollout_identity
from lopd.toy import STUDENT_BASE_DIR, words

TEMPLATE = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
RECORDS = [{"question": "ab=", "solution": "007", "level": "1"}, {"question": "cd=", "solution": "42", "level": "2"}]


def write_source(kind: str, tmp_path: Path, records: list[dict]) -> Path:
    """The same records in one of the accepted formats (CSV and `datasets` keep every value as text)."""
    if kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "parquet":
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "csv":
        path = tmp_path / "p.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        from datasets import Dataset

        path = tmp_path / "p"
        Dataset.from_list(records).save_to_disk(str(path))
    return path


def chat_model(tmp_path: Path) -> Path:
    """A copy of the toy student whose tokenizer has a chat template (the toy tokenizer ships none)."""
    model = tmp_path / "chat_student"
    shutil.copytree(STUDENT_BASE_DIR, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    return model


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(LopdError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "datasets"])
def test_each_format_loads_with_field_mapping(tmp_path, kind):
    rows = load_prompts(write_source(kind, tmp_path, RECORDS), prompt_field="question", answer_field="solution")
    assert [r["prompt"] for r in rows] == ["ab=", "cd="]
    assert [str(r["answer"]) for r in rows] == ["007", "42"]
    assert [r["id"] for r in rows] == ["p-0", "p-1"]  # default ids: file stem + 0-based index
    assert rows[1]["level"] == "2"  # original fields stay, for verifiers


def test_ids_and_answers_are_taken_from_the_source(tmp_path):
    path = write_source("parquet", tmp_path, [{"id": 7, "prompt": "ab=", "answer": "b"}, {"prompt": "cd="}])
    rows = load_prompts(path)
    assert [(r["id"], r["prompt"], r["answer"]) for r in rows] == [("7", "ab=", "b"), ("p-1", "cd=", None)]


def test_csv_cells_stay_text(tmp_path):
    assert load_prompts(write_source("csv", tmp_path, RECORDS), "question", "solution")[0]["answer"] == "007"


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_duplicate_prompt_ids_are_refused_naming_both_places(tmp_path, kind):
    """Before: two prompts with one id were both rolled out under it; now the file is refused before any engine."""
    records = [{"id": "q1", "prompt": "ab="}, {"id": "q2", "prompt": "cd="}, {"id": "q1", "prompt": "ef="}]
    path = write_source(kind, tmp_path, records)
    first, second = ("line 1", "line 3") if kind == "jsonl" else ("row 1", "row 3")
    one_line_error(lambda: load_prompts(path), "prompt id 'q1' appears twice", f"{path} {first}", f"{path} {second}")


def test_duplicate_ids_stop_rollout_before_the_engine(tmp_path):
    from click.testing import CliRunner

    from lopd.cli import main

    path = write_source("jsonl", tmp_path, [{"id": 3, "prompt": "ab="}, {"id": "3", "prompt": "cd="}])
    result = CliRunner().invoke(main, ["rollout", "--model", str(STUDENT_BASE_DIR), "--prompts", str(path),
                                       "--root", str(tmp_path / "root")])
    assert result.exit_code == 2 and result.stderr.startswith("error: prompt id '3' appears twice"), result.output
    assert not (tmp_path / "root" / "rollouts").exists()


@pytest.mark.parametrize("value,kind", [(12, "a number (int)"), (1.5, "a number (float)"), (None, "null"),
                                        (["ab="], "a list")])
def test_a_prompt_that_is_not_text_says_what_it_is(tmp_path, value, kind):
    """Before: {"prompt": 12} read "has no string field 'prompt' (fields: answer, prompt)", as if it were absent."""
    path = write_source("jsonl", tmp_path, [{"prompt": value, "answer": "b"}])
    message = one_line_error(lambda: load_prompts(path), f"line 1: field 'prompt' is {kind}", "not text",
                             "write the prompt as a string", "--prompt-field")
    assert "has no string field" not in message


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "datasets"])
def test_missing_prompt_field_names_the_fields_and_the_option(tmp_path, kind):
    path = write_source(kind, tmp_path, RECORDS)
    where = "line 1" if kind == "jsonl" else "row 1"
    one_line_error(lambda: load_prompts(path), f"{where} has no string field 'prompt'", "question, solution",
                   "--prompt-field")


def test_missing_answer_field_is_refused(tmp_path):
    path = write_source("jsonl", tmp_path, RECORDS)
    one_line_error(lambda: load_prompts(path, "question", "answr"), "no field 'answr'", "--answer-field")


def test_unknown_extension_lists_the_formats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("ab=\n")
    one_line_error(lambda: load_prompts(path), "unknown format '.txt'", "JSON Lines", "Parquet", "CSV", "datasets")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl_is_refused(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    one_line_error(lambda: load_prompts(path), "holds no prompts")


def test_empty_csv_is_refused(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\n")
    one_line_error(lambda: load_prompts(path), "holds no prompts")


def test_dataset_dict_asks_for_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(RECORDS), "test": Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    one_line_error(lambda: load_prompts(tmp_path / "dd"), "DatasetDict", "train, test", str(tmp_path / "dd" / "train"))
    assert len(load_prompts(tmp_path / "dd" / "test", "question")) == 2


def test_plain_directory_and_bad_hub_spec_are_refused(tmp_path):
    one_line_error(lambda: load_prompts(tmp_path), "not a `datasets` save_to_disk directory")
    one_line_error(lambda: load_prompts("hf:openai/gsm8k"), "hf:NAME:SPLIT")


def test_chat_encoding_uses_the_template_without_re_adding_bos(tmp_path):
    tokenizer = load_tokenizer(str(chat_model(tmp_path)))
    rows = [{"id": "a", "prompt": "ab="}]
    assert tokenizer.decode(encode_prompts(tokenizer, rows)[0]) == "<bos>ab="
    chat = encode_prompts(tokenizer, rows, PromptFormat(chat=True))[0]
    assert tokenizer.decode(chat) == "ab=="
    system = encode_prompts(tokenizer, rows, PromptFormat(chat=True, system_prompt="x"))[0]
    assert tokenizer.decode(system) == "x=ab=="


def test_chat_without_a_template_and_system_without_chat_are_refused():
    tokenizer = load_tokenizer(str(STUDENT_BASE_DIR))
    one_line_error(lambda: encode_prompts(tokenizer, [{"id": "a", "prompt": "ab="}], PromptFormat(chat=True)),
                   "has no chat template", "drop --chat")
    one_line_error(lambda: PromptFormat(system_prompt="be brief").validate(), "--system-prompt", "--chat")


def test_chat_and_system_prompt_are_part_of_the_rollout_identity(tmp_path):
    model = str(chat_model(tmp_path))
    tokenizer = load_tokenizer(model)
    rows = [{"id": "a", "prompt": "ab=", "answer": None}]

    def set_id(prompt_format: PromptFormat) -> str:
        ids = encode_prompts(tokenizer, rows, prompt_format)
        return digest_json(rollout_identity(model, tokenizer, SamplingConfig(), rows, ids, None, prompt_format))

    plain = rollout_identity(model, tokenizer, SamplingConfig(), rows, encode_prompts(tokenizer, rows), None, PromptFormat())
    assert "prompt_format" not in plain  # plain rollout sets keep their earlier ids
    ids = {set_id(PromptFormat()), set_id(PromptFormat(chat=True)), set_id(PromptFormat(chat=True, system_prompt="x"))}
    assert len(ids) == 3


def test_cli_rollout_refuses_chat_without_template(tmp_path):
    prompts = write_source("csv", tmp_path, RECORDS)
    result = subprocess.run([sys.executable, "-m", "lopd.cli", "rollout", "--model", str(STUDENT_BASE_DIR),
                             "--prompts", str(prompts), "--prompt-field", "question", "--chat", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no chat template" in lines[0], result.stderr
    assert not (tmp_path / "rollouts").exists()


class RecordingEngine:
    """Passes calls to a real engine and keeps the prompt ids sent and the ones vLLM reports it generated from."""

    def __init__(self, llm):
        self.llm = llm
        self.sent: list[list[int]] = []
        self.generated_from: list[list[int]] = []

    def __getattr__(self, name):  # the engine's configuration (context length, scheduler limits)
        return getattr(self.llm, name)

    def generate(self, prompts, params, use_tqdm=False):
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        self.sent = [list(p["prompt_token_ids"]) for p in prompts]
        self.generated_from = [list(o.prompt_token_ids) for o in outputs]
        return outputs


@pytest.mark.slow
def test_chat_rollout_stores_the_ids_it_generated_from(tmp_path, pool):
    model = str(chat_model(tmp_path))
    prompts = [asdict(p) for p in words.make_prompts("test", 4)]
    engine = RecordingEngine(pool.get(model))
    rollouts, reused = rollout(model, prompts, SamplingConfig(n=1, max_tokens=6), root=tmp_path / "root", llm=engine,
                               quiet=True, prompt_format=PromptFormat(chat=True))
    assert not reused
    tokenizer = AutoTokenizer.from_pretrained(model)
    stored = [ids.tolist() for ids in rollouts.prompt_ids]
    assert [tokenizer.decode(ids) for ids in stored] == [p["prompt"] + "=" for p in prompts]
    assert engine.sent == engine.generated_from == stored
    assert rollouts.meta["prompt_format"] == {"chat": True, "system_prompt": None}
    # The behaviour log-probs are those of the stored ids as context: an independent forward pass agrees.
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for prompt_ids, response_ids, behaviour in zip(rollouts.prompt_ids, rollouts.response_ids, rollouts.behaviour_logprobs):
        ids = torch.tensor(np.concatenate([prompt_ids, response_ids]))[None]
        with torch.no_grad():
            logp = reference(input_ids=ids).logits[0].float().log_softmax(-1)
        start = len(prompt_ids) - 1
        sampled = logp[start : start + len(response_ids)].gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(behaviour, sampled.numpy(), atol=1e-3)
