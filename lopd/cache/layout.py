"""The on-disk layout of one score-set shard (a Zarr v3 group) and its checksum. Spec: docs/cache-format.md.

A shard holds the teacher signal for a contiguous range of rollout rows, flattened over response
positions: `offsets[r]..offsets[r+1]` are row r's positions. Each array is written as one Zarr shard
file of several chunks (fewer inodes, independent chunk reads).

`write_shard` takes the logical arrays (offsets, sampled_logprob, topk_ids, topk_logprobs, tail_logprob) and
stores three of them through lossless, vectorised transforms that make them compress (measured in
tools/bench_cache.py: ~87 bytes per position at k=32 on a 151,936-token vocabulary, against ~104-118 for the
plain arrays, ~200 for Parquet list columns and 392 for float32 + int64):

- topk_ids -> `id_table` (the shard's distinct ids, most frequent first) + `topk_id_codes` (index into it):
  frequent tokens get small codes whatever the tokenizer's id order, so byte-shuffled zstd entropy-codes them.
- topk_logprobs -> `topk_logprob_deltas`: the float bits mapped to an order key (magnitude bits for values <= 0),
  differenced along the rank axis with wrap-around. Sorted top-k rows give small non-negative deltas.
- sampled_logprob -> `sampled_rank` (the first top-k column holding the same bits, or the escape value) +
  `sampled_extra` (the values with no match, in position order): the sampled token is usually in the top-k.

Every transform is exact on the bits (wrapping integer arithmetic), so `read_shard` returns arrays equal to what
was written, float16 or float32, whatever their order or values. `read_shard` also reads shards whose logical
arrays are stored as-is (`write_shard(..., encode=False)`, the layout of the first version-1 writer).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BloscShuffle, TransposeCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, MemoryStore

from lopd.location import Location, files, is_bucket, read_bytes

FORMAT_VERSION = 1
CHUNK_POSITIONS = 1 << 16
LOGPROB_DTYPES = ("float16", "float32")
ARRAYS = ("offsets", "sampled_logprob", "topk_ids", "topk_logprobs", "tail_logprob")
ENCODED = {  # logical array -> the stored arrays it becomes
    "topk_ids": ("topk_id_codes", "id_table"),
    "topk_logprobs": ("topk_logprob_deltas",),
    "sampled_logprob": ("sampled_rank", "sampled_extra"),
}
_BITS = {np.dtype(np.float16): np.dtype(np.uint16), np.dtype(np.float32): np.dtype(np.uint32)}


@dataclass(frozen=True)
class Codec:
    """The Zarr compressor settings: blosc(zstd) with byte shuffle for multi-byte arrays, zstd for bytes.

    Blosc maps its clevel 1..8 to zstd level 2*clevel-1 and 9 to zstd's maximum (22); the default was chosen by
    measurement (tools/bench_cache.py, "codec sweep"): clevel 5 with 1 MiB blocks, rank-major log-prob deltas."""

    clevel: int = 5
    blocksize: int = 1 << 20
    rank_major: bool = True  # topk_logprob_deltas through the transpose codec (order [1, 0])

    def compressor(self, dtype: np.dtype):
        if dtype.itemsize > 1:
            return BloscCodec(cname="zstd", clevel=self.clevel, shuffle=BloscShuffle.shuffle,
                              typesize=dtype.itemsize, blocksize=self.blocksize)
        return ZstdCodec(level=2 * self.clevel - 1)


DEFAULT_CODEC = Codec()


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


# ---- transforms (numpy, exact) -------------------------------------------------------------------------------

def encode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids [P, k] -> (codes [P, k], table [D]) with ids == table[codes]; table = distinct ids by descending count
    (ties: smaller id first), codes in the narrowest unsigned type that indexes the table."""
    flat = ids.reshape(-1)
    if flat.size and ids.dtype.kind == "u" and ids.dtype.itemsize <= 4 and int(flat.max()) < (1 << 24):
        counts = np.bincount(flat, minlength=1)  # O(n); ids are small non-negative integers
        present = np.flatnonzero(counts)
        order = present[np.argsort(-counts[present], kind="stable")]
        code_of = np.zeros(len(counts), np.int64)
        code_of[order] = np.arange(len(order))
        table = order.astype(ids.dtype)
    else:
        values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        rank = np.argsort(-counts, kind="stable")
        code_of = np.empty(len(values), np.int64)
        code_of[rank] = np.arange(len(values))
        table, flat = values[rank].astype(ids.dtype), inverse
    codes = code_of[flat].astype(id_dtype(max(len(table), 1))).reshape(ids.shape)
    return codes, table


_BLOCK = 8192  # rows per step of the decoders: keeps a [block, k] slab and its index temporaries in cache


def decode_ids(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = np.zeros(codes.shape, table.dtype)
    if table.size:
        for start in range(0, len(codes), _BLOCK):
            np.take(table, codes[start:start + _BLOCK], out=out[start:start + _BLOCK])
    return out


def _order_key(bits: np.ndarray) -> np.ndarray:
    """Bijective on the unsigned bit patterns: magnitude bits for negative floats (sign set), 2^w-1-b otherwise;
    so a descending run of values <= 0 has a non-decreasing key (+0 wraps to -1, just below -0's key 0)."""
    sign = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
    key = bits ^ sign
    positive = bits < sign
    key[positive] = ~bits[positive]
    return key


def _order_key_inverse_(key: np.ndarray) -> np.ndarray:
    """In place: key -> bits."""
    sign = key.dtype.type(1 << (8 * key.dtype.itemsize - 1))
    positive = key >= sign
    np.bitwise_xor(key, sign, out=key)
    if positive.any():  # log-probs are <= 0; only +0 (and junk) takes this branch
        key[positive] = ~(key[positive] ^ sign)
    return key


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """[P, k] float16/float32 -> unsigned deltas of the order key along k (column 0 holds the key itself)."""
    key = _order_key(logprobs.view(_BITS[logprobs.dtype]))
    deltas = key.copy()
    np.subtract(key[:, 1:], key[:, :-1], out=deltas[:, 1:])  # wraps modulo 2^w
    return deltas


def decode_logprobs(deltas: np.ndarray, inplace: bool = False) -> np.ndarray:
    key = deltas if inplace else deltas.copy()
    for start in range(0, len(key), _BLOCK):  # column adds over cache-sized slabs beat cumsum(axis=1) ~3x
        block = key[start:start + _BLOCK]
        for j in range(1, key.shape[1]):
            np.add(block[:, j], block[:, j - 1], out=block[:, j])
    float_dtype = {v: k for k, v in _BITS.items()}[deltas.dtype]
    return _order_key_inverse_(key).view(float_dtype)


def encode_sampled(sampled: np.ndarray, topk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sampled [P] -> (rank [P]: first top-k column with identical bits, or the escape value = the dtype's max;
    extra [E]: the escaped values in position order)."""
    bits_type = _BITS[sampled.dtype]
    k = topk.shape[1]
    rank_type = np.uint8 if k < 255 else np.uint16 if k < 65535 else np.uint32
    escape = np.iinfo(rank_type).max
    equal = topk.view(bits_type) == sampled.view(bits_type)[:, None]
    found = equal.any(axis=1) if k else np.zeros(len(sampled), bool)
    rank = np.where(found, equal.argmax(axis=1) if k else 0, escape).astype(rank_type)
    return rank, sampled[~found]


def decode_sampled(rank: np.ndarray, extra: np.ndarray, topk: np.ndarray) -> np.ndarray:
    escaped = rank == np.iinfo(rank.dtype).max
    out = np.empty(len(rank), topk.dtype)
    inside = ~escaped
    out[inside] = topk[np.flatnonzero(inside), rank[inside]]
    out[escaped] = extra
    return out


def encode_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logical arrays -> stored arrays (see ENCODED); anything without a transform is stored as-is."""
    stored = dict(arrays)
    if "topk_ids" in arrays and arrays["topk_ids"].ndim == 2:
        stored["topk_id_codes"], stored["id_table"] = encode_ids(stored.pop("topk_ids"))
    topk = arrays.get("topk_logprobs")
    if topk is not None and topk.ndim == 2 and topk.dtype in _BITS:
        stored["topk_logprob_deltas"] = encode_logprobs(stored.pop("topk_logprobs"))
        sampled = arrays.get("sampled_logprob")
        if sampled is not None and sampled.dtype == topk.dtype and sampled.shape == topk.shape[:1]:
            stored["sampled_rank"], stored["sampled_extra"] = encode_sampled(stored.pop("sampled_logprob"), topk)
    return stored


def decode_arrays(stored: dict[str, np.ndarray], inplace: bool = False) -> dict[str, np.ndarray]:
    """Stored arrays -> logical arrays; `inplace` lets it reuse (overwrite) the stored arrays' memory."""
    out = {name: stored[name] for name in ARRAYS if name in stored}
    if "topk_id_codes" in stored:
        out["topk_ids"] = decode_ids(stored["topk_id_codes"], stored["id_table"])
    if "topk_logprob_deltas" in stored:
        out["topk_logprobs"] = decode_logprobs(stored["topk_logprob_deltas"], inplace=inplace)
    if "sampled_rank" in stored:
        out["sampled_logprob"] = decode_sampled(stored["sampled_rank"], stored["sampled_extra"], out["topk_logprobs"])
    return out


# ---- Zarr I/O ----------------------------------------------------------------------------------------------------

def _group_store(path: Location, read_only: bool = True) -> str | FsspecStore:
    """Where `zarr.open_group` finds a shard: the local directory, or zarr's fsspec store on a bucket prefix."""
    if is_bucket(path):
        return FsspecStore.from_url(path, read_only=read_only)
    return str(path)


def write_shard(path: Location, arrays: dict[str, np.ndarray], *, encode: bool = True, codec: Codec = DEFAULT_CODEC) -> None:
    stored = encode_arrays(arrays) if encode else dict(arrays)
    attributes = {"lopd_format_version": FORMAT_VERSION}
    if encode:
        attributes["lopd_encoded"] = {name: list(parts) for name, parts in ENCODED.items() if parts[0] in stored}
        attributes["lopd_dtypes"] = {name: str(data.dtype) for name, data in arrays.items()}
    group = zarr.open_group(_group_store(path, read_only=False), mode="w", attributes=attributes)
    for name, data in stored.items():
        rows = data.shape[0]
        chunk = (min(CHUNK_POSITIONS, max(rows, 1)),) + data.shape[1:]
        n_chunks = max(1, -(-rows // chunk[0]))
        # Rank-major bytes inside a chunk: deltas of one rank share a distribution, which zstd codes better.
        filters = [TransposeCodec(order=(1, 0))] if name == "topk_logprob_deltas" and codec.rank_major else None
        group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=chunk, shards=(chunk[0] * n_chunks,) + data.shape[1:],
            filters=filters, compressors=codec.compressor(data.dtype), fill_value=0,
        )[...] = data


def _read_group(store: str | Store) -> dict[str, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    return {name: array[...] for name, array in group.arrays()}


def read_stored(path: Location) -> dict[str, np.ndarray]:
    """The arrays as stored (encoded), by name."""
    return _read_group(_group_store(path))


def read_shard(path: Location) -> dict[str, np.ndarray]:
    """The logical arrays (ARRAYS), whichever way the shard stores them."""
    return decode_arrays(read_stored(path), inplace=True)


def read_shard_checked(path: Location, checksum: str | None) -> dict[str, np.ndarray] | None:
    """`read_shard` after checking the shard's files against `checksum` (None: no check); None when they differ.

    A bucket shard is fetched once, checksummed and decoded from memory, so its bytes cross the network once; a
    local shard is checksummed, then read from disk again (the page cache holds it)."""
    if not is_bucket(path):
        return None if checksum is not None and shard_checksum(path) != checksum else read_shard(path)
    fetched = {relative: read_bytes(file) for relative, file, _ in files(path)}
    if checksum is not None and _digest(fetched.items()) != checksum:
        return None
    buffer = default_buffer_prototype().buffer
    store = MemoryStore({key: buffer.from_bytes(data) for key, data in fetched.items()}, read_only=True)
    return decode_arrays(_read_group(store), inplace=True)


def _digest(named_bytes: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for relative, data in named_bytes:
        h.update(relative.encode())
        h.update(data)
    return h.hexdigest()


def shard_checksum(path: Location) -> str:
    """sha256 over every file of the shard (relative path + bytes), in sorted order; the same digest whether the
    shard lies in a local directory or under a bucket prefix. Files are read one at a time."""
    return _digest((relative, read_bytes(file)) for relative, file, _ in files(path))


def shard_bytes(path: Location) -> int:
    return sum(size for _, _, size in files(path))
