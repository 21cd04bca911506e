"""The module DeepSpeed trains: a causal LM whose forward returns the loss's student log-probs, not logits.

Going through the engine's forward keeps DeepSpeed's backward bookkeeping (its output hooks run the ZeRO
backward prologue before any parameter gradient arrives), while the forward itself never builds the
[B, L, V] logits: the backbone's hidden states at response positions go through `lm_head` a chunk at a
time (lopd.losses.student). The wrapped model stays reachable as `.lm` for saving, sampling and refresh.
"""
from __future__ import annotations

import torch

from lopd.losses.student import StudentLogprobs, StudentRequest, student_logprobs
from lopd.train.config import TrainConfig
from lopd.train.data import Batch


def load_student(path: str, config: TrainConfig) -> StudentHead:
    """The student as DeepSpeed will train it: weights in the configured dtype, optional gradient checkpointing and
    LoRA adapters (peft), wrapped in a StudentHead that runs lm_head `config.loss_chunk_size` positions at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets if config.lora_targets == "all-linear" else [
            name.strip() for name in config.lora_targets.split(",") if name.strip()]
        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return StudentHead(model, config.loss_chunk_size)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside `model` (a peft wrapper's base model, or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class StudentHead(torch.nn.Module):
    """`forward(batch, request)` -> StudentLogprobs of the wrapped causal LM on the batch's response tokens."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int | None):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """The final (normed) hidden states at the positions predicting each response token: [B, T, H]."""
        backbone = causal_lm(self.lm).get_decoder()
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return batch.response_rows(hidden)

    def forward(self, batch: Batch, request: StudentRequest) -> StudentLogprobs:
        return student_logprobs(self.hidden_states(batch), causal_lm(self.lm).get_output_embeddings(), batch.tokens,
                                batch.mask, batch.fields.get("topk_ids"), request, self.chunk_size)

    @torch.no_grad()
    def full_logits(self, batch: Batch) -> torch.Tensor:
        """Every logit at the response positions, [B, T, V], without grad: only for the aligned-token filter."""
        return causal_lm(self.lm).get_output_embeddings()(self.hidden_states(batch))
