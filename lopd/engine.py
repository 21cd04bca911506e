"""Building vLLM engines with the checks that turn engine crashes into one-line errors.

vLLM kills its engine core on some bad requests (k above the vocabulary, an unsupported CPU head size);
everything checkable is checked here, before the engine starts.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from lopd.errors import LopdError

# vLLM's CPU attention kernel supports only these head sizes (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def resolve_model(model: str | os.PathLike) -> str:
    """A local model directory, or a hub name left for vLLM/transformers to resolve."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LopdError(f"model path {text} has no config.json; pass a Hugging Face model directory or hub name")
        return str(path.resolve())
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text and text.count("/") != 1
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LopdError(f"model path {text} does not exist; pass a Hugging Face model directory or hub name")
    return text


def model_config(model: str) -> dict[str, Any]:
    path = Path(model)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def vocab_size(config: dict[str, Any]) -> int:
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def check_cpu_head_dim(model: str, config: dict[str, Any]) -> None:
    dim = head_dim(config)
    if dim not in CPU_HEAD_SIZES:
        raise LopdError(
            f"model {model} has head_dim={dim}, which vLLM's CPU attention does not support; "
            f"use a model whose head_dim is one of {CPU_HEAD_SIZES} (hidden_size / num_attention_heads)"
        )


def check_k(k: int, vocab: int, max_logprobs: int | None = None, padded: int = 0) -> None:
    """`vocab`: the ids the teacher's tokenizer defines; `padded`: extra log-probs scoring asks for beyond k, for
    ids of a padded embedding the tokenizer does not define (lopd.score.padded_ids)."""
    if k < 0:
        raise LopdError(f"--k must be >= 0, got {k}")
    if k > vocab:
        raise LopdError(f"--k {k} is larger than the teacher vocabulary ({vocab}); use --k <= {vocab}")
    if max_logprobs is not None and k + padded > max_logprobs:
        needed = f"{k} + {padded} for padded vocabulary ids = {k + padded}" if padded else str(k)
        raise LopdError(f"--k {needed} log-probs is more than the engine's max_logprobs ({max_logprobs}); "
                        "raise max_logprobs (a pipeline's `max_logprobs`) or lower --k")


def _engine_core_main(parent_pid: int, *args, **kwargs):
    """vLLM's EngineCore process entry point, first arming a watchdog: when the lopd process that started the
    engine dies (kill -9 included, which runs no cleanup), the engine core exits too and takes its workers with
    it (they watch it through vLLM's death pipe). Without it a killed `lopd score` left ~2.4 GB of engine
    processes running indefinitely, waiting on a socket nobody would write to again."""
    import threading

    from vllm.v1.engine.core import EngineCoreProc

    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="lopd-parent-watch").start()
    original = EngineCoreProc.run_engine_core
    if isinstance(original, functools.partial):  # forked: the patched class attribute came along
        original = _ORIGINAL_RUN_ENGINE_CORE
    return original(*args, **kwargs)


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5, grace_s: float = 5.0) -> None:
    """Poll the parent pid (an orphan is re-parented, so getppid changes); then SIGTERM this process, which vLLM
    handles by shutting down its workers, and SIGKILL it if that has not finished after `grace_s`. Polling,
    unlike PR_SET_PDEATHSIG, does not fire when merely the thread that started the engine exits."""
    import signal
    import time

    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


_ORIGINAL_RUN_ENGINE_CORE = None


def _engine_dies_with_this_process() -> None:
    """Route vLLM's EngineCore process start through `_engine_core_main` bound to this process's pid. A partial
    of a module-level function pickles by reference, so it works under both fork and spawn start methods."""
    global _ORIGINAL_RUN_ENGINE_CORE
    from vllm.v1.engine.core import EngineCoreProc

    if _ORIGINAL_RUN_ENGINE_CORE is None:
        _ORIGINAL_RUN_ENGINE_CORE = EngineCoreProc.run_engine_core
    EngineCoreProc.run_engine_core = functools.partial(_engine_core_main, os.getpid())


def build_llm(
    model: str,
    *,
    max_logprobs: int = 20,
    max_model_len: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    max_num_batched_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
):
    """A vLLM `LLM` for generation or scoring. Callers must run under `if __name__ == "__main__":`."""
    model = resolve_model(model)
    config = model_config(model)
    cpu = on_cpu()
    if cpu:
        check_cpu_head_dim(model, config)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if dtype == "auto":
            dtype = "float32" if config.get("torch_dtype", config.get("dtype")) in (None, "float32") else "bfloat16"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # Lets `reload_weights` send a function to the engine's own worker process (local IPC only).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    _engine_dies_with_this_process()
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        max_logprobs=max(max_logprobs, 1),
        enforce_eager=cpu,
        max_model_len=max_model_len or min(int(config.get("max_position_embeddings", 4096)), 8192),
    )
    if max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    kwargs.update(extra or {})
    return LLM(**kwargs)


def reload_weights(llm, model_dir: str | Path) -> None:
    """Swap the weights of a running engine for a checkpoint of the same architecture (no restart).

    On CPU, vLLM prepacks linear weights into oneDNN/SGL kernels at load time; its in-place reload refreshes
    the layers it reloads but not a tied `lm_head`, whose packed copy still holds the old embedding. Every
    layer that keeps its weight is therefore re-packed after the reload (tests/test_engine.py checks the
    reloaded engine against transformers).
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
    if on_cpu():
        llm.collective_rpc(_repack_cpu_gemms)
    llm.reset_prefix_cache()


def _repack_cpu_gemms(worker) -> int:
    """Runs inside the vLLM worker: rebuild the CPU GEMM handle of every layer that still holds its weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    repacked = 0
    for module in worker.model_runner.get_model().modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0 and weight.ndim == 2:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            repacked += 1
    return repacked


class EnginePool:
    """One running vLLM engine per architecture; asking for another checkpoint of it swaps weights in place.

    Engine start-up (tens of seconds on CPU) dwarfs toy-sized work, so pipelines that evaluate or roll out
    many checkpoints of one student keep a single engine and reload weights between them.
    """

    def __init__(self, max_logprobs: int = 20, seed: int = 0):
        self.max_logprobs = max_logprobs
        self.seed = seed
        self._engines: dict[str, list] = {}  # architecture key -> [llm, model currently loaded]

    @staticmethod
    def architecture_key(model: str) -> str:
        config = dict(model_config(model))
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            config.pop(volatile, None)
        return json.dumps(config, sort_keys=True, default=str)

    def get(self, model: str):
        model = resolve_model(model)
        key = self.architecture_key(model)
        if key not in self._engines:
            self._engines[key] = [build_llm(model, max_logprobs=self.max_logprobs, seed=self.seed), model]
        entry = self._engines[key]
        if entry[1] != model:
            reload_weights(entry[0], model)
            entry[1] = model
        return entry[0]

    def close(self) -> None:
        import gc

        self._engines.clear()
        gc.collect()
