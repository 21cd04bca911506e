"""Loading models and tokenizers, and what their configs say (vocabulary, context), before any engine exists.

Rollout, scoring, training, evaluation and the guards all read models through here; lopd.engine builds the
vLLM engines on top.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lopd.errors import LopdError

# The config.json keys vLLM reads a model's context length from (the smallest present wins), in vLLM's order.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose `factor` vLLM does not multiply into the context length (already scaled in the config).
_SCALED_ROPE_TYPES = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def resolve_model(model: str | os.PathLike) -> str:
    """A local model directory, or a hub name left for vLLM/transformers to resolve."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LopdError(f"model path {text} has no config.json; pass a Hugging Face model directory or hub name")
        return str(path.resolve())
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text and text.count("/") != 1
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LopdError(f"model path {text} does not exist; pass a Hugging Face model directory or hub name")
    return text


def model_config(model: str) -> dict[str, Any]:
    path = Path(model)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def vocab_size(config: dict[str, Any]) -> int:
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def model_context(config: dict[str, Any]) -> int | None:
    """The context length vLLM derives from a model's config (None when the config names none; vLLM then
    assumes 2,048). Mirrors vLLM's rule: the smallest length key present, times a RoPE scaling factor."""
    text = config.get("text_config") or config
    lengths = [int(text[k]) for k in CONTEXT_KEYS if isinstance(text.get(k), (int, float))]
    if not lengths:
        return None
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    factor = 1.0
    if rope.get("rope_type", rope.get("type", "default")) not in _SCALED_ROPE_TYPES:
        factor = float(rope.get("factor") or 1.0)
    return int(min(lengths) * factor)
