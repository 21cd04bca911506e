"""The `lopd` command line: a thin layer over the stage functions; every user error is one line and exit code 2."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from lopd import location
from lopd.errors import LopdError
from lopd.limits import option_type
from lopd.location import Location
from lopd.storage import resolve_root, writable_root


def experiment_option(default: str | None = "default", shown: str | bool = True, note: str = ""):
    """`--experiment`, the same on every command; `lopd train` defaults it per loss (`note` says so)."""
    return click.option("--experiment", envvar="LOPD_EXPERIMENT", default=default, show_default=shown,
                        help=f"Experiment name recorded in the cost ledger ($LOPD_EXPERIMENT).{note}")


EXPERIMENT_OPTION = experiment_option()
ROOT_DEFAULT = "(default: $LOPD_ROOT, else storage/ of a source checkout, else $XDG_CACHE_HOME/lopd, i.e. ~/.cache/lopd)"
ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False), default=None,
                           help=f"Storage root {ROOT_DEFAULT}.")
# Commands that write through lopd.location take a bucket root; the others (demo, diagnose) refuse one.
BUCKET_ROOT_OPTION = click.option("--root", default=None,
                                  help=f"Storage root: a directory or a bucket URL such as s3://bucket/prefix {ROOT_DEFAULT}.")
ENGINE_ARG_OPTION = click.option(
    "--engine-arg", "engine_arg_items", multiple=True, metavar="KEY=VALUE",
    help="vLLM engine option (repeatable), typed by vLLM's EngineArgs: tensor_parallel_size=4, max_model_len=32768, "
         "gpu_memory_utilization=0.85, dtype=bfloat16, quantization=fp8, ... (docs/engine.md).")

RAY_OPTIONS = [
    click.option("--ray", "use_ray", is_flag=True,
                 help="Run the engines as Ray actors (lopd.replicas): on the cluster at --ray-address, else "
                      "$RAY_ADDRESS, else a local one; seeds and score sets are those of one engine (docs/cluster.md). "
                      "Needs `pip install 'lopd[ray]'`."),
    click.option("--ray-address", default=None, help="Ray cluster to join (with --ray), e.g. ray://head:10001 or auto."),
    click.option("--replicas", default=None, type=click.IntRange(min=1),
                 help="Engine replicas with --ray (default 1); each reserves its engine's GPUs "
                      "(tensor_parallel_size of them) or one CPU."),
]


def ray_options(command):
    for option in reversed(RAY_OPTIONS):
        command = option(command)
    return command


def ray_placement(use_ray: bool, address: str | None, replicas: int | None, shard_spec: str = "0/1"):
    """The Ray placement the options ask for, or None (one engine in this process)."""
    from lopd.replicas import RayPlacement

    if not use_ray:
        if address or replicas:
            raise LopdError(f"{'--ray-address' if address else '--replicas'} needs --ray")
        return None
    if shard_spec != "0/1":
        raise LopdError("--ray hands the shards to its replicas itself; drop --shard (it is for schedulers without Ray)")
    return RayPlacement(replicas=replicas or 1, address=address)


def emit(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


def train_config_options(command):
    """One option per TrainConfig field, typed from the field and range-checked from lopd.limits (the same check
    TrainConfig runs for pipeline files): `lopd train` and pipeline train stages accept exactly the same settings."""
    from dataclasses import MISSING, fields
    from typing import get_args, get_type_hints

    from lopd.limits import LIMITS
    from lopd.train.config import TrainConfig

    hints = get_type_hints(TrainConfig)
    for f in reversed(fields(TrainConfig)):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        args = [t for t in get_args(kind) if t is not type(None)]
        tuple_of = args if getattr(kind, "__origin__", None) is tuple else None
        base = args[0] if args and tuple_of is None else kind
        kwargs: dict = {"default": None if f.default is MISSING else f.default, "help": f.metadata["help"],
                        "show_default": True}
        if base is bool:
            kwargs.update(is_flag=True)
        elif f.metadata.get("choices"):
            kwargs.update(type=click.Choice(f.metadata["choices"]))
        elif f.name in LIMITS:
            kwargs.update(type=LIMITS[f.name].click_type())
        else:
            kwargs.update(type=tuple_of[0] if tuple_of else base)
        if tuple_of:
            kwargs.update(nargs=len(tuple_of))
        command = click.option(f"--{f.name.replace('_', '-')}", f.name, **kwargs)(command)
    return command


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise LopdError(f"--shard expects i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise LopdError(f"--shard {text}: need 0 <= i < N")
    return i, n


def parse_pairs(items: tuple[str, ...], option: str) -> dict[str, str]:
    """Repeated `--option key=value` arguments as a dict of strings."""
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LopdError(f"{option} expects key=value, got {item!r}")
        args[key.strip()] = value.strip()
    return args


def parse_engine_args(items: tuple[str, ...]) -> dict:
    """`--engine-arg key=value` pairs typed and checked against vLLM's EngineArgs (before any engine starts)."""
    if not items:
        return {}
    from lopd.engine import check_engine_args

    return check_engine_args(parse_pairs(items, "--engine-arg"))


def parse_refresh(items: tuple[str, ...]) -> dict:
    """`--refresh key=value` pairs typed after RefreshPolicy's fields."""
    from dataclasses import fields

    from lopd.train.drift import RefreshPolicy

    types = {f.name: f.type for f in fields(RefreshPolicy)}
    policy = {}
    for key, value in parse_pairs(items, "--refresh").items():
        if key not in types:
            raise LopdError(f"--refresh {key}: unknown; choose from {', '.join(types)}")
        if "bool" in str(types[key]):
            policy[key] = value.lower() in ("1", "true", "yes", "on")
        elif "int" in str(types[key]):
            policy[key] = int(value)
        else:
            policy[key] = float(value)
    RefreshPolicy(**policy)
    return policy


def prompt_options(command):
    """The prompt-source and sampling options `lopd rollout` and `lopd eval` share (same names, same checks)."""
    for option in reversed([
        click.option("--prompts", required=True, type=click.Path(),
                     help="Prompt source: .jsonl, .parquet, .csv, a `datasets` save_to_disk directory, or "
                          "hf:NAME[:CONFIG]:SPLIT."),
        click.option("--prompt-field", default="prompt", show_default=True, help="Field that holds the prompt text."),
        click.option("--answer-field", default="answer", show_default=True,
                     help="Field that holds the reference answer (optional per row)."),
        click.option("--chat", is_flag=True,
                     help="Format each prompt with the model's chat template (one user turn + generation prompt)."),
        click.option("--system-prompt", default=None, help="System turn placed before each prompt (needs --chat)."),
        click.option("--n", default=1, show_default=True, type=option_type("n"), help="Samples per prompt."),
        click.option("--temperature", default=1.0, show_default=True, type=option_type("temperature")),
        click.option("--top-p", default=1.0, show_default=True, type=option_type("top_p")),
        click.option("--max-tokens", default=None, type=option_type("max_tokens"),
                     help="Most tokens per response (default: as many as the engine's context leaves after the "
                          "prompt; set --engine-arg max_model_len to bound it)."),
        click.option("--seed", default=0, show_default=True),
    ]):
        command = option(command)
    return command


def find_artifact(ref: str, root: Location, kind: str) -> Location:
    """A score set (`kind` "scores") or rollout set ("rollouts") by path, id or unique id prefix under a local or
    bucket root: the resolver `lopd cache show` uses (lopd.storage.find_artifact)."""
    from lopd.cache.score_set import MANIFEST
    from lopd.rollout_set import META
    from lopd.storage import find_artifact as find

    marker, noun = {"scores": (MANIFEST, "score set"), "rollouts": (META, "rollout set")}[kind]
    return find(location.join(root, kind), ref, marker, noun)


class Lopd(click.Group):
    """The root command: every user error (a LopdError, or a bad option click refuses) is one line on stderr and
    exit code 2, never a traceback or a usage dump. Lives on the command itself so click's CliRunner sees what a
    user sees."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except LopdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click would show it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} -h`)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)


def package_version() -> str:
    """lopd's version from its installed package metadata, else `lopd.__version__` where a checkout defines one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lopd")
    except PackageNotFoundError:
        import lopd

        return getattr(lopd, "__version__", "unknown (not installed: pip install -e .)")


def print_version(ctx: click.Context, _param, value: bool) -> None:
    """`lopd --version`, read only when asked (package metadata takes tens of ms: `lopd --help` stays fast)."""
    if value and not ctx.resilient_parsing:
        click.echo(f"lopd {package_version()}")
        ctx.exit()


@click.group(cls=Lopd, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=print_version,
              help="Print the lopd version and exit.")
def main() -> None:
    """lopd: offline on-policy distillation with a durable, shareable teacher cache."""


@main.command()
@click.option("--model", required=True, help="Model that generates (HF directory or hub name).")
@prompt_options
@click.option("--verifier", default=None, help="Reward function module:function, e.g. lopd.toy.words:verify.")
@click.option("--tool", default=None,
              help="Tool environment module:attr, e.g. lopd.toy.calc:ENVIRONMENT: multi-turn generation with the tool's "
                   "observations inserted (and masked out of the loss).")
@click.option("--judge", default=None,
              help="Rubric judge module:function returning a score in [0, 1] (stored as rubric_reward), e.g. "
                   "lopd.toy.calc:judge.")
@click.option("--skip-invalid", is_flag=True,
              help="Leave out empty prompts and prompts too long for the engine's context (counted in the set's "
                   "metadata) instead of stopping at the first.")
@click.option("--out", default=None, help="Output directory or bucket URL (default: content-addressed under the root).")
@ENGINE_ARG_OPTION
@ray_options
@EXPERIMENT_OPTION
@BUCKET_ROOT_OPTION
def rollout(model, prompts, prompt_field, answer_field, chat, system_prompt, n, temperature, top_p, max_tokens, seed,
            verifier, tool, judge, skip_invalid, out, engine_arg_items, use_ray, ray_address, replicas, experiment, root):
    """Generate rollouts with vLLM into a Parquet rollout set."""
    from lopd.prompts import PromptFormat, load_prompts
    from lopd.rollout import SamplingConfig, rollout as run

    start = time.perf_counter()
    engine_args = parse_engine_args(engine_arg_items)
    placement = ray_placement(use_ray, ray_address, replicas)
    prompt_format = PromptFormat(chat=chat, system_prompt=system_prompt)
    prompt_format.validate()
    rows = load_prompts(prompts, prompt_field, answer_field)
    sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    rollouts, reused = run(model, rows, sampling, root=writable_root(root), verifier=verifier, out=out,
                          experiment=experiment, prompt_format=prompt_format, tool=tool, judge=judge,
                          engine_args=engine_args, skip_invalid=skip_invalid, placement=placement)
    emit({"rollout_set": rollouts.id, "path": rollouts.path, "rows": len(rollouts), "reused": reused,
          "response_tokens": rollouts.meta["num_response_tokens"],
          "truncated": rollouts.meta.get("truncated", {}).get("length", 0),
          "skipped_prompts": sum(v for k, v in rollouts.meta.get("skipped_prompts", {}).items() if k != "ids"),
          "seconds": round(time.perf_counter() - start, 1)})


@main.command()
@click.option("--teacher", required=True, help="Scoring model (HF directory or hub name); must share the student's vocabulary.")
@click.option("--rollouts", "rollouts_ref", required=True, help="Rollout set directory or id.")
@click.option("--k", default=32, show_default=True, type=option_type("k"), help="Teacher top-k stored per position.")
@click.option("--logprob-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--max-batch-tokens", default=16384, show_default=True, type=option_type("max_batch_tokens"), help="Token budget per vLLM scoring call (bounds prompt-logprob memory).")
@click.option("--rows-per-shard", default=1024, show_default=True, type=option_type("rows_per_shard"))
@click.option("--context", "--context-template", "context", default=None,
              help="Privileged context for a self-teacher: a preset (answer, wrong_answer, concise) or a template "
                   "such as '{answer}|' over the row's prompt, answer, prompt_id, wrong_answer; spliced before the "
                   "prompt (after BOS) for scoring only; part of the cache key.")
@click.option("--context-slice", default=0, show_default=True, type=option_type("context_slice"),
              help="Score with only the prompt's last N tokens (OPSDL's short-context self-teacher); 0 keeps it all.")
@click.option("--shard", "shard_spec", default="0/1", show_default=True, help="Score only shards i, i+N, ... (i/N) for multi-node jobs.")
@click.option("--out", type=click.Path(file_okay=False), default=None)
@ENGINE_ARG_OPTION
@ray_options
@EXPERIMENT_OPTION
@BUCKET_ROOT_OPTION
def score(teacher, rollouts_ref, k, logprob_dtype, max_batch_tokens, rows_per_shard, context, context_slice, shard_spec,
          out, engine_arg_items, use_ray, ray_address, replicas, experiment, root):
    """Score every rollout token once with the teacher (vLLM) into a Zarr v3 score set.

    The engine's context is the longest stored row plus one token (every row fits) and its prefill chunk is
    4,096 tokens (bounds memory); --engine-arg max_model_len=N / max_num_batched_tokens=N override them.
    """
    from lopd.cache.cli import report_score
    from lopd.rollout_set import RolloutSet
    from lopd.score import ScoreConfig, score as run

    engine_args = parse_engine_args(engine_arg_items)
    placement = ray_placement(use_ray, ray_address, replicas, shard_spec)
    root = writable_root(root)
    rollouts = RolloutSet.open(find_artifact(rollouts_ref, root, "rollouts"))
    config = ScoreConfig(k=k, logprob_dtype=logprob_dtype, max_batch_tokens=max_batch_tokens, rows_per_shard=rows_per_shard,
                         context=context, context_slice=context_slice)
    result = run(teacher, rollouts, config, root=root, out=out, shard_of=parse_shard(shard_spec), experiment=experiment,
                 engine_args=engine_args, placement=placement)
    report_score(result)


@main.command()
@click.option("--student", required=True, help="Model to train (HF directory or hub name).")
@click.option("--cache", "cache_ref", default=None, help="Score set directory or id (OPD losses).")
@click.option("--rollouts", "rollouts_ref", default=None, help="Rollout set directory or id (the sft loss).")
@click.option("--loss", required=True, help="Registered loss, e.g. rkl_topk (the README's recommendation); see `lopd losses`.")
@click.option("--loss-arg", "loss_args", multiple=True, help="Loss hyperparameter key=value (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--refresh", "refresh_args", multiple=True,
              help="Cache refresh policy key=value (repeatable): kl=0.05, weight_out_of_band=0.2, band=0.2, "
                   "check_every=25, every_step=true. Needs --teacher.")
@click.option("--teacher", default=None, help="Teacher that scored the cache (needed to re-score refreshed shards).")
@click.option("--base", "base_ref", default=None,
              help="Score set of the same rollouts by the base/reference model (G-OPD's pi_base: exopd).")
@click.option("--contrast", "contrast_ref", default=None,
              help="Score set of the same rollouts under the incorrect-hint context (RLCSD's contrast: rlcsd).")
@train_config_options
@ENGINE_ARG_OPTION
@experiment_option(None, "default-<loss>", " Named per loss by default, so that `lopd cost` shows each loss apart.")
@BUCKET_ROOT_OPTION
def train(student, cache_ref, rollouts_ref, loss, loss_args, out, refresh_args, teacher, base_ref, contrast_ref,
          engine_arg_items, experiment, root, **options):
    """Train a student with DeepSpeed from a cache (or rollout set, for SFT)."""
    from lopd.cache.reader import open_cache
    from lopd.losses import get_loss
    from lopd.rollout_set import RolloutSet
    from lopd.train.trainer import TrainConfig, train as run

    if location.is_bucket(out):
        raise LopdError(f"--out {out}: training writes its checkpoints to a directory on this machine; give a local "
                        "path (`lopd run --root s3://...` publishes pipeline models to the bucket)")
    root = writable_root(root)
    get_loss(loss)
    experiment = experiment or f"default-{loss}"
    engine_args = parse_engine_args(engine_arg_items)
    if engine_args and not refresh_args:
        raise LopdError("--engine-arg applies to the engines a cache refresh runs; it needs --refresh (training "
                        "itself runs no vLLM engine)")
    if (cache_ref is None) == (rollouts_ref is None):
        raise LopdError("pass exactly one of --cache (a score set) or --rollouts (a rollout set, for --loss sft)")
    refresh = parse_refresh(refresh_args)
    config = TrainConfig(loss=loss, loss_args=parse_pairs(loss_args, "--loss-arg"), refresh=refresh, **options)
    source = (open_cache(find_artifact(cache_ref, root, "scores"), max_decoded_shards=config.max_decoded_shards)
              if cache_ref else RolloutSet.open(find_artifact(rollouts_ref, root, "rollouts")))
    context = None
    if refresh:
        if not teacher:
            raise LopdError("--refresh needs --teacher (the model that scored the cache) to re-score refreshed shards")
        from lopd.engine import EnginePool
        from lopd.train.refresh import RefreshContext

        context = RefreshContext(teacher, EnginePool(max_logprobs=max(source.k, 1), engine_args=engine_args), root,
                                 experiment)
    attached = {field: open_cache(find_artifact(ref, root, "scores"), max_decoded_shards=config.max_decoded_shards)
                for field, ref in (("base_logprobs", base_ref), ("contrast_logprobs", contrast_ref)) if ref}
    result = run(student, source, config, Path(out), root=root, experiment=experiment, attached=attached,
                 refresh_context=context)
    emit({"checkpoint": result.checkpoint, "model": result.model, "steps": result.steps, "tokens": result.tokens,
          "seconds": round(result.seconds, 1), "final": result.final_metrics})


@main.command("eval")
@click.option("--model", required=True)
@prompt_options
@click.option("--verifier", required=True,
              help="Reward function module:function scoring each response, e.g. lopd.toy.words:verify.")
@click.option("--tool", default=None, help="Tool environment module:attr (as for `lopd rollout --tool`).")
@ENGINE_ARG_OPTION
@ray_options
@EXPERIMENT_OPTION
@BUCKET_ROOT_OPTION
def eval_(model, prompts, prompt_field, answer_field, chat, system_prompt, n, temperature, top_p, max_tokens, seed,
          verifier, tool, engine_arg_items, use_ray, ray_address, replicas, experiment, root):
    """Accuracy of a model on a prompt set (vLLM sampling + verifier)."""
    from lopd.evaluate import evaluate
    from lopd.prompts import PromptFormat, load_prompts
    from lopd.rollout import SamplingConfig

    engine_args = parse_engine_args(engine_arg_items)
    placement = ray_placement(use_ray, ray_address, replicas)
    prompt_format = PromptFormat(chat=chat, system_prompt=system_prompt)
    prompt_format.validate()
    rows = load_prompts(prompts, prompt_field, answer_field)
    sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    emit(evaluate(model, rows, verifier, sampling,
                  root=writable_root(root), experiment=experiment, prompt_format=prompt_format, tool=tool,
                  engine_args=engine_args, placement=placement).as_dict())


@main.command()
def losses():
    """List registered losses, their papers, needs and defaults."""
    from lopd.losses import REGISTRY

    for spec in sorted(REGISTRY.values(), key=lambda s: s.name):
        args = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "-"
        click.echo(f"{spec.name:16s} {spec.paper:32s} needs: {', '.join(spec.needs) or '-':28s} args: {args}")


@main.group()
def toy():
    """The bundled toy worlds (dictionary completion; calculator tool use)."""


@toy.command("prompts")
@click.option("--split", type=click.Choice(["teacher", "sft", "opd", "eval", "test"]), required=True)
@click.option("--n", default=500, show_default=True, type=option_type("n"))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--world", type=click.Choice(["words", "calc"]), default="words", show_default=True,
              help="calc: calculator expressions for `--tool lopd.toy.calc:ENVIRONMENT --verifier lopd.toy.calc:verify`.")
def toy_prompts(split, n, out, world):
    """Write a split of toy prompts as JSON Lines."""
    from lopd.toy.worlds import toy_world

    module = toy_world(world)
    click.echo(module.write_prompts_jsonl(module.make_prompts(split, n), out))


@main.command("run")
@click.argument("pipeline", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print the plan (which stages run, which are reused) and stop.")
@BUCKET_ROOT_OPTION
def run_(pipeline, dry_run, root):
    """Execute a pipeline file (TOML/YAML) from pipelines/; finished stages with unchanged inputs are skipped."""
    from lopd.pipeline.plan import load_spec
    from lopd.pipeline.run import run_pipeline

    run_pipeline(load_spec(pipeline), writable_root(root), dry_run=dry_run)


@main.command()
@click.option("--seeds", default=None, help="Comma-separated seeds (default: the pipeline's, 0,1).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Results directory (default: <root>/demo).")
@click.option("--quick", is_flag=True, help="pipelines/smoke_toy.toml: seconds-scale, for smoke tests (numbers meaningless).")
@ROOT_OPTION
def demo(seeds, out, quick, root):
    """Lightning OPD on the bundled toy models, end to end, with SFT-more and online-OPD baselines."""
    from lopd.demo import run_demo

    root = resolve_root(root)
    run_demo(quick, [int(s) for s in seeds.split(",")] if seeds else None, root, Path(out) if out else root / "demo")


@main.group()
def diagnose():
    """Diagnostics of a cache and a student (no training)."""


@diagnose.command("alignment")
@click.option("--cache", "cache_ref", required=True, help="Score set directory or id (its rollouts need rewards and --n > 1).")
@click.option("--student", required=True, help="Student checkpoint (HF directory or hub name).")
@click.option("--signal", default="rkl_topk", show_default=True, help="Registered loss used as the teacher signal.")
@click.option("--signal-arg", "signal_args", multiple=True, help="Signal loss hyperparameter key=value (repeatable).")
@click.option("--rows", default=256, show_default=True, type=option_type("rows"), help="Rollouts analysed (sampled by --seed among those with A_GRPO != 0).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report directory (default: <root>/diagnostics/alignment-<cache>-<student fp>-<signal>).")
@ROOT_OPTION
def diagnose_alignment(cache_ref, student, signal, signal_args, rows, seed, out, root):
    """Cosine between the teacher-signal and GRPO outcome gradients, per rollout and per token (arXiv 2605.10889)."""
    from lopd.cache.reader import open_cache
    from lopd.train.alignment import diagnose_alignment as run

    root = resolve_root(root)
    cache = open_cache(find_artifact(cache_ref, root, "scores"))
    report = run(student, cache, signal=signal, signal_args=parse_pairs(signal_args, "--signal-arg"), rows=rows,
                 seed=seed, out=Path(out) if out else None, root=root)
    emit({"report": report["out"], "cache": report["cache"], "signal": report["signal"],
          "rows": report["rows_sampled"], "rows_zero_advantage": report["rows_zero_advantage"],
          "per_rollout": {s: {k: report["per_rollout"][s][k] for k in ("count", "mean", "fraction_positive")}
                          for s in ("failed", "successful")},
          "per_token": {s: {k: report["per_token"][s][k] for k in ("count", "mean", "fraction_positive")}
                        for s in ("failed", "successful")},
          "seconds": report["seconds"]})


def _attach_subcommands() -> None:
    from lopd.cache.cli import cache
    from lopd.cost.cli import cost, report

    main.add_command(cache)
    main.add_command(cost)
    main.add_command(report)


_attach_subcommands()


def run() -> None:
    main()


if __name__ == "__main__":
    run()
