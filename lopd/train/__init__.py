"""Stage 3, `lopd train`: DeepSpeed training from a cache, with drift-triggered refresh and the alignment filter."""
