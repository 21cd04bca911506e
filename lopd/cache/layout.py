"""The on-disk layout of one score-set shard (a Zarr v3 group) and its checksum. Spec: storage/README.md.

A shard holds the teacher signal for a contiguous range of rollout rows, flattened over response
positions: `offsets[r]..offsets[r+1]` are row r's positions. Each array is written as one Zarr shard
file of several chunks (fewer inodes, independent chunk reads).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

FORMAT_VERSION = 1
CHUNK_POSITIONS = 1 << 16
LOGPROB_DTYPES = ("float16", "float32")
ARRAYS = ("offsets", "sampled_logprob", "topk_ids", "topk_logprobs", "tail_logprob")


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _compressor(dtype: np.dtype):
    # Byte-shuffled zstd inside blosc: groups the high bytes of 16-bit log-probs, which compress well.
    if dtype.itemsize > 1:
        return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=dtype.itemsize)
    return ZstdCodec(level=3)


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    group = zarr.open_group(str(path), mode="w", attributes={"lopd_format_version": FORMAT_VERSION})
    for name, data in arrays.items():
        rows = data.shape[0]
        chunk = (min(CHUNK_POSITIONS, max(rows, 1)),) + data.shape[1:]
        n_chunks = max(1, -(-rows // chunk[0]))
        group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=chunk, shards=(chunk[0] * n_chunks,) + data.shape[1:],
            compressors=_compressor(data.dtype), fill_value=0,
        )[...] = data


def read_shard(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][...] for name in ARRAYS if name in group}


def shard_checksum(path: Path) -> str:
    """sha256 over every file of the shard (relative path + bytes), in sorted order."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def shard_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
