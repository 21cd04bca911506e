"""Engine helpers: a pooled engine that swaps weights must serve exactly the new checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopd.engine import EnginePool
from lopd.toy import STUDENT_BASE_DIR

pytestmark = pytest.mark.slow


def prompt_logprobs(llm, ids: list[int]) -> np.ndarray:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
    flat = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].prompt_logprobs
    return np.array([flat.logprobs[flat.start_indices[p]] for p in range(1, len(ids))])


def reference_logprobs(model_dir, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()


def test_pool_swaps_weights_exactly(pool: EnginePool, tmp_path):
    """Checkpoint B (same architecture as A, different weights) served by A's engine after a reload."""
    other = tmp_path / "perturbed"
    model = AutoModelForCausalLM.from_pretrained(STUDENT_BASE_DIR, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(STUDENT_BASE_DIR).save_pretrained(other)
    ids = [1, 22, 40, 4, 5, 6, 2]
    base_engine = pool.get(str(STUDENT_BASE_DIR))
    np.testing.assert_allclose(prompt_logprobs(base_engine, ids), reference_logprobs(STUDENT_BASE_DIR, ids), atol=1e-3)
    swapped = pool.get(str(other))
    assert swapped is base_engine  # same architecture: one engine, weights swapped
    np.testing.assert_allclose(prompt_logprobs(swapped, ids), reference_logprobs(other, ids), atol=1e-3)
    back = pool.get(str(STUDENT_BASE_DIR))
    np.testing.assert_allclose(prompt_logprobs(back, ids), reference_logprobs(STUDENT_BASE_DIR, ids), atol=1e-3)
