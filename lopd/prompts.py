"""Reading prompt sets (JSON Lines, Parquet, CSV, Hugging Face `datasets`) and how a prompt becomes model input.

Every source becomes the same rows: `id`, `prompt`, `answer`, plus every original field (verifiers read them).
Only the text is read here; token ids are made once, at rollout, and stored, so nothing is re-tokenised later.
"""
from __future__ import annotations

import csv
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lopd.errors import LopdError

HUB_PREFIX = "hf:"
DEFAULT_ANSWER_FIELD = "answer"
FORMATS = "JSON Lines (.jsonl), Parquet (.parquet), CSV (.csv), a `datasets` directory (save_to_disk) or hf:NAME[:CONFIG]:SPLIT"

# (where, record): `where` names the record in errors ("line 3", "row 3").
Records = Iterator[tuple[str, Any]]


@dataclass(frozen=True)
class PromptFormat:
    """Whether prompts go to the model as raw text or through its chat template (with an optional system turn).

    Part of a rollout set's identity: the same text under another template is a different input.
    """

    chat: bool = False
    system_prompt: str | None = None

    def validate(self) -> None:
        if self.system_prompt is not None and not self.chat:
            raise LopdError("--system-prompt only applies with --chat (it becomes the chat's system turn); add --chat")

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return system + [{"role": "user", "content": prompt}]


PLAIN = PromptFormat()


def load_prompts(source: str | Path, prompt_field: str = "prompt",
                 answer_field: str = DEFAULT_ANSWER_FIELD) -> list[dict[str, Any]]:
    """Rows with normalised keys `id`, `prompt`, `answer` (plus every original field, for verifiers), and
    `_where` (source and line or row) so a later check, e.g. of the prompt's length, can name the record.

    `source` is a file (format by extension), a `datasets` directory, or `hf:NAME[:CONFIG]:SPLIT` on the hub.
    The answer is optional per row (generation needs none), but a non-default `answer_field` that no row has
    is a typo, and is refused.
    """
    text = str(source)
    name, reader = (text, _read_hub(text)) if text.startswith(HUB_PREFIX) else _read_path(Path(source))
    records = list(reader)
    rows = [_normalise(name, where, record, prompt_field, answer_field) for where, record in records]
    _refuse_duplicate_ids(rows)
    if not rows:
        raise LopdError(f"prompts {name} holds no prompts; pass a file with at least one {prompt_field!r} record")
    if answer_field != DEFAULT_ANSWER_FIELD and all(answer_field not in record for _, record in records):
        raise LopdError(f"prompts {name} have no field {answer_field!r} (fields: {_fields(records[0][1])}); "
                        f"pass --answer-field to name the field that holds the answer")
    return rows


def _read_path(path: Path) -> tuple[str, Records]:
    if not path.exists():
        raise LopdError(f"prompts file {path} does not exist")
    if path.is_dir():
        return str(path), _read_dataset_dir(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv}
    if path.suffix not in readers:
        raise LopdError(f"prompts file {path}: unknown format {path.suffix or '(no extension)'!r}; use {FORMATS}")
    return str(path), readers[path.suffix](path)


def _read_jsonl(path: Path) -> Records:
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LopdError(f"prompts file {path} line {lineno} is not JSON; expected one JSON object per line") from None
            # Ids default to the 0-based line index (as before tabular formats existed): rollout ids stay stable.
            yield f"line {lineno}", _with_default_id(obj, f"{path.stem}-{lineno - 1}")


def _read_parquet(path: Path) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise LopdError(f"prompts file {path} is not readable Parquet ({_first_line(exc)})") from None
    yield from _tabular(path.stem, table.to_pylist())


def _read_csv(path: Path) -> Records:
    """Every cell is read as text (no type inference: an answer `007` stays `007`); a spreadsheet's BOM is dropped."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        yield from _tabular(path.stem, list(csv.DictReader(f)))


def _read_dataset_dir(path: Path) -> Records:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise LopdError(f"prompts {path} is a DatasetDict with splits {', '.join(splits)}; pass one split's "
                        f"directory, e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise LopdError(f"prompts {path} is a directory but not a `datasets` save_to_disk directory; use {FORMATS}")
    from datasets import load_from_disk

    yield from _tabular(path.name, load_from_disk(str(path)).to_list())


def _read_hub(spec: str) -> Records:
    """`hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: the split is always named, so no split is used by accident."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise LopdError(f"prompts {spec!r}: a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, e.g. hf:openai/gsm8k:main:test")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
    from datasets import load_dataset

    try:
        with _quiet("huggingface_hub", "datasets"):
            dataset = load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing config/split, auth: all surface as a one-line error
        raise LopdError(f"cannot load hub dataset {spec} ({_first_line(exc)}); without network, save it with "
                        f"`datasets` save_to_disk elsewhere and pass that directory") from None
    yield from _tabular(f"{name.rsplit('/', 1)[-1]}-{split}", dataset.to_list())


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Hide the hub clients' per-retry warnings: a failed load ends in one error line, not a page of retries."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _tabular(stem: str, records: list[dict[str, Any]]) -> Records:
    for index, record in enumerate(records):
        yield f"row {index + 1}", _with_default_id(record, f"{stem}-{index}")


def _with_default_id(record: Any, default: str) -> Any:
    if isinstance(record, dict) and record.get("id") is None:
        return dict(record, id=default)
    return record


def _normalise(name: str, where: str, record: Any, prompt_field: str, answer_field: str) -> dict[str, Any]:
    if isinstance(record, dict) and prompt_field in record and not isinstance(record[prompt_field], str):
        value = record[prompt_field]
        raise LopdError(f"prompts {name} {where}: field {prompt_field!r} is {_kind(value)}, {value!r}, not text; "
                        f"write the prompt as a string (e.g. \"{value}\") or pass --prompt-field to name the field "
                        "that holds the prompt text")
    if not isinstance(record, dict) or prompt_field not in record:
        fields = _fields(record) if isinstance(record, dict) else "none"
        raise LopdError(f"prompts {name} {where} has no string field {prompt_field!r} (fields: {fields}); "
                        f"pass --prompt-field to name the field that holds the prompt")
    return dict(record, id=str(record["id"]), prompt=record[prompt_field], answer=record.get(answer_field),
                _where=f"{name} {where}")


def _kind(value: Any) -> str:
    """A non-text value as an error names it: "a number (int)", "null", "a list"."""
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({type(value).__name__})"
    return f"a {type(value).__name__}"


def _refuse_duplicate_ids(rows: list[dict[str, Any]]) -> None:
    """Prompt ids key rollout rows (and their rewards and groups), so two prompts with one id would be confused."""
    first: dict[str, str] = {}
    for row in rows:
        if row["id"] in first:
            raise LopdError(f"prompt id {row['id']!r} appears twice: {first[row['id']]} and {row['_where']}; "
                            "give every prompt its own id (or leave out `id` to number prompts by position)")
        first[row["id"]] = row["_where"]


def _fields(record: dict[str, Any]) -> str:
    """The record's own fields, for error messages (`id` may be one lopd filled in)."""
    return ", ".join(sorted(k for k in record if k != "id"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
