"""Content fingerprints of models, tokenizers and files: the inputs of every cache key.

A fingerprint changes exactly when the numbers a stage would produce can change: model weights and
config, the tokenizer's vocabulary/special tokens/chat template. Hashing multi-GB weights is slow, so
file digests are memoised on (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def digest_json(obj: Any) -> str:
    """Stable short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def model_fingerprint(model: str) -> str:
    """Hash of config.json plus every weight file for a local directory; `hub:name` for a hub name."""
    path = Path(model)
    if not path.is_dir():
        revision = os.environ.get("LOPD_MODEL_REVISION", "main")
        return "hub-" + digest_json({"name": model, "revision": revision})
    parts = {"config": json.loads((path / "config.json").read_text())}
    parts["weights"] = {
        p.name: file_digest(p) for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES and p.is_file()
    }
    return digest_json(parts)


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges/normaliser (the backend JSON), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {"vocab": tokenizer.get_vocab()}
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return digest_json(
        {
            "tokenizer": spec,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
        }
    )


def vocabulary_fingerprint(tokenizer) -> str:
    """Token string -> id, and nothing else: what stored token ids mean.

    Tokenizers with equal vocabulary fingerprints read each other's ids correctly even when their full
    fingerprints differ (another chat template or normaliser).
    """
    return digest_json(tokenizer.get_vocab())
