"""`lopd demo`: the Lightning OPD recipe on the bundled toy world, end to end, against fair baselines.

Per seed: the teacher writes SFT data -> the student base is SFT'd on it -> the SFT student rolls out on the
OPD prompts -> the teacher scores those rollouts once -> offline OPD from that one cache (`lightning`, and
`rkl_topk`, reverse KL over the cached teacher top-k) -> evaluation. Baselines trained for the same steps
from the same SFT checkpoint: SFT-more (SFT on teacher samples for the OPD prompts) and online OPD
(`rkl_topk` on rollouts re-sampled and re-scored every step).
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lopd.cache.reader import open_cache
from lopd.engine import EnginePool
from lopd.evaluate import evaluate
from lopd.rollout import SamplingConfig, encode_prompts, load_tokenizer, rollout
from lopd.score import ScoreConfig, score
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR
from lopd.toy import words
from lopd.train.online import OnlineSampler
from lopd.train.trainer import TrainConfig, steps_for, train

VERIFIER = "lopd.toy.words:verify"


@dataclass(frozen=True)
class DemoConfig:
    sft_prompts: int = 20000
    sft_steps: int = 3000
    sft_batch: int = 128
    sft_lr: float = 3e-3
    opd_prompts: int = 2000
    opd_samples: int = 4  # rollouts per OPD prompt
    opd_epochs: float = 4.0
    opd_batch: int = 64
    rkl_lr: float = 1e-3
    lightning_lr: float = 1e-4
    sft_more_lr: float = 1e-3
    k: int = 32
    temperature: float = 1.0
    max_tokens: int = 10
    eval_prompts: int = 2000

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(sft_prompts=512, sft_steps=20, sft_batch=32, opd_prompts=64, opd_samples=2, opd_epochs=1.0,
                   opd_batch=16, eval_prompts=64)


ARMS = ("teacher", "student_base", "sft", "sft_more", "lightning", "rkl_topk", "online_rkl")
ARM_LABELS = {
    "teacher": "teacher", "student_base": "student base", "sft": "SFT student",
    "sft_more": "SFT-more (teacher samples, same steps)", "lightning": "offline OPD: lightning (cache)",
    "rkl_topk": "offline OPD: rkl_topk (cache)", "online_rkl": "online OPD: rkl_topk (re-sampled every step)",
}


@contextmanager
def timed(name: str, seconds: dict[str, float]):
    start = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def run_seed(config: DemoConfig, seed: int, root: Path, out: Path, pool: EnginePool, prompts: dict[str, list],
             results: dict[str, Any]) -> None:
    seconds: dict[str, float] = {}
    ckpt = out / f"seed{seed}"
    exp = lambda arm: f"demo/seed{seed}/{arm}"  # noqa: E731  (ledger experiment name per arm)
    sampling = SamplingConfig(n=1, temperature=config.temperature, max_tokens=config.max_tokens, seed=seed)
    teacher = str(TEACHER_DIR)

    with timed("teacher_sft_data", seconds):
        sft_data, _ = rollout(teacher, prompts["sft"], sampling, root=root, verifier=VERIFIER, llm=pool.get(teacher),
                              experiment=exp("sft"))
    with timed("sft", seconds):
        sft_cfg = TrainConfig(loss="sft", lr=config.sft_lr, batch_size=config.sft_batch, steps=config.sft_steps,
                              warmup_steps=config.sft_steps // 20, seed=seed)
        sft = train(str(STUDENT_BASE_DIR), sft_data, sft_cfg, ckpt / "sft", root=root, experiment=exp("sft")).checkpoint
    opd_sampling = replace(sampling, n=config.opd_samples)
    with timed("student_rollouts", seconds):
        opd_rollouts, _ = rollout(str(sft), prompts["opd"], opd_sampling, root=root, verifier=VERIFIER,
                                  llm=pool.get(str(sft)), experiment=exp("rkl_topk"))
    with timed("teacher_score", seconds):
        scored = score(teacher, opd_rollouts, ScoreConfig(k=config.k), root=root, llm=pool.get(teacher),
                       experiment=exp("rkl_topk"))
    cache = open_cache(scored.path)
    opd = TrainConfig(batch_size=config.opd_batch, epochs=config.opd_epochs, seed=seed)
    steps = steps_for(opd, len(cache))
    checkpoints = {"sft": sft}
    for arm, loss, lr in (("lightning", "lightning", config.lightning_lr), ("rkl_topk", "rkl_topk", config.rkl_lr)):
        with timed(f"train_{arm}", seconds):
            checkpoints[arm] = train(str(sft), cache, replace(opd, loss=loss, lr=lr), ckpt / arm, root=root,
                                     experiment=exp(arm)).checkpoint
    with timed("teacher_sft_more_data", seconds):
        more_data, _ = rollout(teacher, prompts["opd"], opd_sampling, root=root, verifier=VERIFIER, llm=pool.get(teacher),
                               experiment=exp("sft_more"))
    with timed("train_sft_more", seconds):
        checkpoints["sft_more"] = train(str(sft), more_data, replace(opd, loss="sft", lr=config.sft_more_lr, steps=steps),
                                        ckpt / "sft_more", root=root, experiment=exp("sft_more")).checkpoint
    with timed("train_online_rkl", seconds):
        tok = load_tokenizer(str(sft))
        sampler = OnlineSampler(teacher, encode_prompts(tok, prompts["opd"]), k=config.k, n=config.opd_samples,
                                temperature=config.temperature, max_tokens=config.max_tokens,
                                micro_batch_size=config.opd_batch, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                seed=seed)
        checkpoints["online_rkl"] = train(str(sft), None, replace(opd, loss="rkl_topk", lr=config.rkl_lr, steps=steps),
                                          ckpt / "online_rkl", batches=sampler.factory(), root=root,
                                          experiment=exp("online_rkl")).checkpoint
    with timed("eval", seconds):
        for arm, path in checkpoints.items():
            results["arms"][arm][str(seed)] = evaluate(str(path), prompts["eval"], VERIFIER, max_tokens=config.max_tokens,
                                                       llm=pool.get(str(path)), root=root, experiment=exp(arm)).as_dict()
    results["seconds"][str(seed)] = {k: round(v, 1) for k, v in seconds.items()}
    results["opd_steps"] = steps
    results["cache"][str(seed)] = {"score_set": scored.id, "rollout_set": opd_rollouts.id,
                                   "teacher_seconds": round(scored.teacher_seconds, 2), "positions": scored.positions}


def run_demo(config: DemoConfig, seeds: list[int], root: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    prompts = {
        "sft": [asdict(p) for p in words.make_prompts("sft", config.sft_prompts)],
        "opd": [asdict(p) for p in words.make_prompts("opd", config.opd_prompts)],
        "eval": [asdict(p) for p in words.make_prompts("eval", config.eval_prompts)],
    }
    results: dict[str, Any] = {"config": asdict(config), "seeds": seeds, "arms": {a: {} for a in ARMS},
                               "seconds": {}, "cache": {}}
    pool = EnginePool(max_logprobs=config.k)
    start = time.perf_counter()
    for arm, model in (("teacher", TEACHER_DIR), ("student_base", STUDENT_BASE_DIR)):
        scores = evaluate(str(model), prompts["eval"], VERIFIER, max_tokens=config.max_tokens, llm=pool.get(str(model)),
                          root=root, experiment=f"demo/{arm}")
        results["arms"][arm] = {str(s): scores.as_dict() for s in seeds}
    for seed in seeds:
        run_seed(config, seed, root, out, pool, prompts, results)
    pool.close()
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    plot_results(results, out / "results.png")
    print(table)
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return results


def results_table(results: dict[str, Any]) -> str:
    seeds = [str(s) for s in results["seeds"]]
    lines = [
        "| arm | " + " | ".join(f"seed {s} valid % (distinct)" for s in seeds) + " | mean valid % |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for arm in ARMS:
        cells = [results["arms"][arm][s] for s in seeds]
        mean = statistics.mean(c["accuracy"] for c in cells) * 100
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(f"{c['accuracy'] * 100:.1f} ({c['distinct_correct']})" for c in cells)
                     + f" | {mean:.1f} |")
    lines.append("")
    stages = sorted({k for s in seeds for k in results["seconds"][s]})
    lines.append("| stage | " + " | ".join(f"seed {s} s" for s in seeds) + " |")
    lines.append("|---|" + "---|" * len(seeds))
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{results['seconds'][s].get(stage, 0):.1f}" for s in seeds) + " |")
    lines.append(f"\nOPD arms and SFT-more: {results['opd_steps']} steps each from the same SFT checkpoint; "
                 f"total wall time {results['total_seconds']:.0f} s.")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = [str(s) for s in results["seeds"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, arm in enumerate(ARMS):
        values = [results["arms"][arm][s]["accuracy"] * 100 for s in seeds]
        ax.bar(i, statistics.mean(values), color="tab:blue" if "opd" not in ARM_LABELS[arm].lower() else "tab:orange")
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(ARMS)), [ARM_LABELS[a].split(" (")[0] for a in ARMS], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("valid completions at T=1 (%)")
    low = min(results["arms"][a][s]["accuracy"] for a in ARMS[2:] for s in seeds) * 100
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_title("lopd demo: toy dictionary world (bars: mean, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
