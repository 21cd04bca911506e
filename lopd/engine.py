"""Building vLLM engines with the checks that turn engine crashes into one-line errors.

vLLM kills its engine core on some bad requests (k above the vocabulary, an unsupported CPU head size);
everything checkable is checked here, before the engine starts.
"""
from __future__ import annotations

import atexit
import collections.abc
import difflib
import enum
import functools
import json
import logging
import os
import sys
import types
import typing
import weakref
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator, Mapping

from lopd.errors import LopdError
from lopd.models.loading import model_config, model_context, resolve_model

# vLLM's CPU attention kernel supports only these head sizes (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Engine options that change the numbers an engine computes (not just where or how fast): they enter rollout
# and score set ids, so two caches made under different values never share an id.
NUMERIC_ENGINE_ARGS = ("dtype", "quantization", "max_model_len", "kv_cache_dtype")
# Engine options lopd sets from its own command-line options.
OWNED_ENGINE_ARGS = {"model": "--model / --teacher"}
# Token budget of one scoring engine step (vLLM's chunked prefill). vLLM computes a float32 [tokens, vocab] logits
# copy per step for prompt log-probs outside its memory budget, so this bounds scoring memory: 4,096 tokens x
# 151,936 vocab x 4 B = 2.5 GB. It is vLLM's CPU default; on a GPU vLLM would take 16,384 (about 10 GB).
SCORING_BATCHED_TOKENS = 4096
# How long an engine core may take to exit after SIGTERM before it is killed. vLLM's own grace is 5 s, which a
# CPU engine on a loaded machine overruns (its worker alone takes ~3 s to exit), and a killed engine core leaks its
# shared-memory queues. Only a hung engine waits this long.
ENGINE_SHUTDOWN_SECONDS = 30.0
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


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


def engine_context(model: str, config: dict[str, Any], engine_args: Mapping[str, Any]) -> int | None:
    """The context an engine for `model` will have: `max_model_len` if the user set it, else the model's own.

    Known before the engine starts, so prompts and lengths are checked without paying for engine start-up.
    """
    native = model_context(config)
    requested = engine_args.get("max_model_len")
    if requested is None:
        return native
    if native is not None and requested > native and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        raise LopdError(f"--engine-arg max_model_len={requested} exceeds the context of {model} ({native} tokens "
                        f"in its config.json); use at most {native} (or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
    return int(requested)


def running_context(llm) -> int:
    """The context length of a running engine."""
    return int(llm.llm_engine.model_config.max_model_len)


@cache
def engine_arg_types() -> dict[str, Any]:
    """vLLM's engine options and their types, read from its own `EngineArgs` dataclass (so they follow vLLM)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM warns about Triton while importing, before its own logging config applies that level.
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
    from vllm.engine import arg_utils

    types_ = {}
    for f in fields(arg_utils.EngineArgs):
        hint = f.type
        if isinstance(hint, str):
            try:
                hint = eval(hint, vars(arg_utils))  # noqa: S307 - vLLM's own annotation text
            except NameError:
                hint = Any  # an annotation vLLM only imports for type checkers; the value passes through
        types_[f.name] = hint
    return types_


def check_engine_args(args: Mapping[str, Any], where: str = "--engine-arg") -> dict[str, Any]:
    """Engine options checked against vLLM's `EngineArgs`, values typed by its field types, before any engine starts.

    `args` come from `--engine-arg KEY=VALUE` (text) or a pipeline's `[engine]` table (TOML values). An
    unknown key is a one-line error naming the closest valid keys.
    """
    known = engine_arg_types()
    checked = {}
    for key, value in args.items():
        if key in OWNED_ENGINE_ARGS:
            raise LopdError(f"{where} {key}: lopd sets it from {OWNED_ENGINE_ARGS[key]}; drop it from the engine options")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see vllm.engine.arg_utils.EngineArgs for the names"
            raise LopdError(f"{where} {key}: not a vLLM engine option; {hint}")
        checked[key] = _typed(key, value, known[key], where)
    return checked


def _typed(key: str, value: Any, hint: Any, where: str) -> Any:
    """`value` as the field's type wants it: text is parsed, TOML values are checked."""
    options = _alternatives(hint)
    if value is None or isinstance(value, str) and value.strip().lower() in ("none", "null"):
        if type(None) in options:
            return None
    for option in sorted(options, key=_parse_order):
        try:
            return _as(option, value)
        except (TypeError, ValueError, KeyError, json.JSONDecodeError):
            continue
    raise LopdError(f"{where} {key}={value!r}: expected {_describe(options)}")


def _alternatives(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _alternatives(arg)]
    return [hint]


def _parse_order(option: Any) -> int:
    """Most specific first, so "8" is an int before it is a string."""
    for rank, kind in enumerate((bool, int, float)):
        if option is kind:
            return rank
    return 4 if option is str or option is Any else 3


def _as(option: Any, value: Any) -> Any:
    origin = typing.get_origin(option)
    if option is type(None):
        raise ValueError
    if option is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise ValueError
    if option in (int, float):
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            return option(value.strip().replace("_", ""))
        if option is int and not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ValueError
        return option(value)
    if origin is typing.Literal:
        for choice in typing.get_args(option):
            if value == choice or isinstance(value, str) and str(choice) == value.strip():
                return choice
        raise ValueError
    if isinstance(option, type) and issubclass(option, enum.Enum):
        text = str(value).strip()
        return option[text] if text in option.__members__ else option(text)
    if option is str:
        if not isinstance(value, str):
            raise ValueError
        return value.strip()
    if option is Any:
        return value
    if origin in (dict, collections.abc.Mapping) or option is dict or origin is None and is_dataclass(option):
        parsed = json.loads(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise ValueError
        return parsed
    if origin in (list, tuple):
        parsed = json.loads(value) if isinstance(value, str) else value
        if not isinstance(parsed, (list, tuple)):
            raise ValueError
        return parsed
    raise ValueError  # callables, classes: not expressible as an option value


def _describe(options: list[Any]) -> str:
    names = []
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(option))))
        elif option is type(None):
            names.append("none")
        elif isinstance(option, type) and issubclass(option, enum.Enum):
            names.append("one of " + ", ".join(option.__members__))
        elif isinstance(option, type) and is_dataclass(option) or typing.get_origin(option) is dict:
            names.append("a JSON object")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(dict.fromkeys(names))


def numeric_engine_args(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """The engine options a rollout or score set's numbers depend on, normalised (dtype aliases resolved)."""
    aliases = {"half": "float16", "float": "float32"}
    return {k: aliases.get(engine_args[k], engine_args[k]) for k in NUMERIC_ENGINE_ARGS if k in engine_args}


def set_cpu_engine_env() -> None:
    """lopd's defaults for vLLM's CPU environment variables; a value the user set is kept.

    vLLM keeps one core per worker for its scheduler process, which on a small machine leaves the model a single
    OpenMP thread (1.75x slower scoring on 2 cores, BENCHMARKS.md), so lopd gives the worker every core;
    `VLLM_CPU_NUM_OF_RESERVED_CPU=1` keeps vLLM's reservation (docs/engine.md). The KV cache gets 1 GiB
    (`VLLM_CPU_KVCACHE_SPACE`, in GiB), which scoring and the toy worlds' rollouts fit in.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def build_llm(
    model: str,
    *,
    max_logprobs: int = 20,
    seed: int = 0,
    engine_args: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
):
    """A vLLM `LLM` for generation or scoring. Callers must run under `if __name__ == "__main__":`.

    `defaults` are lopd's own choices for this engine (e.g. scoring's length and chunk size); the user's
    `engine_args` (already checked by `check_engine_args`) override them. Without `max_model_len` vLLM takes the
    model's own context length. The resolved arguments are printed once, to stderr.
    """
    model = resolve_model(model)
    config = model_config(model)
    cpu = on_cpu()
    kwargs: dict[str, Any] = dict(model=model, dtype="auto", seed=seed, max_logprobs=max(max_logprobs, 1),
                                  enforce_eager=cpu)
    kwargs.update(defaults or {})
    kwargs.update(engine_args or {})
    if cpu:
        check_cpu_head_dim(model, config)
        set_cpu_engine_env()
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = "float32" if config.get("torch_dtype", config.get("dtype")) in (None, "float32") else "bfloat16"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # Lets `reload_weights` send a function to the engine's own worker process (local IPC only).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    _engine_dies_with_this_process()
    print("lopd: vLLM engine " + " ".join(f"{k}={v}" for k, v in kwargs.items()), file=sys.stderr)
    llm = LLM(**kwargs)
    # Registered after vLLM's own exit-time finalizers, so it runs before them (atexit is last-in, first-out).
    atexit.register(_shutdown_at_exit, weakref.ref(llm))
    return llm


def shutdown_llm(llm) -> None:
    """Stop an engine's processes (engine core, workers) now, from the calling thread; a second call does nothing.

    Left to interpreter exit, vLLM stops them from atexit finalizers while its engine-core monitor, a daemon thread,
    sees the engine core die and runs the same clean-up (zmq sockets, logging to stderr) concurrently; when the
    interpreter finalizes under that thread, the process can abort after its work is done. The window grows with
    the worker's exit time (seconds on CPU, longer when its OpenMP threads share every core with the scheduler).
    An explicit shutdown leaves the finalizers and the monitor nothing to do.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown(timeout=ENGINE_SHUTDOWN_SECONDS)


def _shutdown_at_exit(ref: weakref.ref) -> None:
    llm = ref()
    if llm is not None:
        shutdown_llm(llm)


@contextmanager
def running_engine(llm, model: str, **build_args: Any) -> Iterator[Any]:
    """`llm` when the caller passes one (left running), else a new `build_llm(model, **build_args)` engine that is
    shut down when the block ends, so a command's engine never outlives its stage."""
    if llm is not None:
        yield llm
        return
    engine = build_llm(model, **build_args)
    try:
        yield engine
    finally:
        shutdown_llm(engine)


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

    def __init__(self, max_logprobs: int = 20, seed: int = 0, engine_args: Mapping[str, Any] | None = None):
        self.max_logprobs = max_logprobs
        self.seed = seed
        self.engine_args = dict(engine_args or {})  # every engine's options; `get` may add per-model ones
        self._engines: dict[str, list] = {}  # architecture + options key -> [llm, model currently loaded]

    @staticmethod
    def architecture_key(model: str) -> str:
        config = dict(model_config(model))
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            config.pop(volatile, None)
        return json.dumps(config, sort_keys=True, default=str)

    def options(self, engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The engine options an engine from `get(model, engine_args)` runs with."""
        return {**self.engine_args, **(engine_args or {})}

    def get(self, model: str, engine_args: Mapping[str, Any] | None = None):
        model = resolve_model(model)
        options = self.options(engine_args)
        key = self.architecture_key(model) + json.dumps(options, sort_keys=True, default=str)
        if key not in self._engines:
            self._engines[key] = [build_llm(model, max_logprobs=self.max_logprobs, seed=self.seed,
                                            engine_args=options), model]
        entry = self._engines[key]
        if entry[1] != model:
            reload_weights(entry[0], model)
            entry[1] = model
        return entry[0]

    def close(self) -> None:
        import gc

        for llm, _ in self._engines.values():
            shutdown_llm(llm)
        self._engines.clear()
        gc.collect()
