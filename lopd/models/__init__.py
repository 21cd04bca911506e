"""The models and tokenizers every stage reads: loading them (loading.py), what produced them (lineage.py), and
the guards that check a student against the cache it trains on (guards.py)."""
