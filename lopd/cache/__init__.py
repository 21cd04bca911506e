"""The teacher cache: score sets of sharded Zarr v3 arrays plus a manifest (format: docs/cache-format.md)."""
from lopd.cache.reader import CachedSequence, ScoreCache, open_cache

__all__ = ["CachedSequence", "ScoreCache", "open_cache"]
