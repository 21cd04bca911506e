"""lopd: offline on-policy distillation."""
