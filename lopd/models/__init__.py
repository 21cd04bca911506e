"""The models and tokenizers every stage reads: loading (loading.py), lineage and guards.

lineage.py records what produced a checkpoint; guards.py checks a student against the cache it trains on.
"""
