"""`lopd rollout` then `lopd score` at vocabulary 151,936 with a local storage root and with an S3 bucket root.

    python tools/bench_bucket_root.py           # ~8 min on 2 CPU cores; tools/results/bench_bucket_root.json
    python tools/bench_bucket_root.py --quick   # 256-token rollouts (nothing written)

Model: the random-weight Qwen3 architecture of tools/real_scale.py (2 layers, hidden 256, vocabulary 151,936), the
student and its own teacher. Prompts: `--prompts` synthetic prompts of 64 tokens; each is sampled to `--max-tokens`
(4,096) new tokens. The bucket is moto's S3 server on this machine (tools/moto_s3.py), reached through the standard
AWS variables like any S3 endpoint. Each command runs in a fresh process; its peak is that of its whole process tree
(tools/bench_score_memory.py `measure`). What must hold: the bucket root makes the local root's sets (same ids, same
rollout table digest, same shard checksums) within the local root's peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from bench_score import finish_results, markdown_table, start_results
from bench_score_memory import measure
from moto_s3 import local_s3, s3_environment
from real_scale import QWEN3_VOCAB, build_qwen3

PROMPT = 64


def sets_under(root: str) -> dict:
    """The one rollout set and one score set under `root`: ids, rollout table digest, shard checksums."""
    from lopd import location
    from lopd.cache.score_set import read_manifest
    from lopd.rollout_set import RolloutSet

    (meta,) = location.glob(f"{root}/rollouts", "*/meta.json")
    (manifest,) = location.glob(f"{root}/scores", "*/manifest.json")
    rollouts, scores = RolloutSet.open(location.parent(meta)), read_manifest(location.parent(manifest))
    return {"rollout_set": rollouts.id, "content_digest": rollouts.meta["content_digest"],
            "response_tokens": rollouts.meta["num_response_tokens"], "score_set": scores["id"],
            "shard_checksums": {name: entry["checksum"] for name, entry in scores["shards"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples of the process tree")
    parser.add_argument("--work", type=Path, default=REPO / "storage" / "bench" / "bucket_root")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    max_tokens = 256 if args.quick else args.max_tokens

    t0 = time.perf_counter()
    results = start_results(vocab=QWEN3_VOCAB, prompt_tokens=PROMPT, prompts=args.prompts, max_tokens=max_tokens,
                            interval=args.interval)
    model = build_qwen3(args.work / "qwen3-2l-h256")
    prompts = args.work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": " ".join(f"t{50 * i + j}" for j in range(PROMPT))})
                               + "\n" for i in range(args.prompts)))
    local = args.work / "root"
    shutil.rmtree(local, ignore_errors=True)
    lopd = [sys.executable, "-m", "lopd.cli"]
    cells, found = [], {}
    with local_s3() as endpoint:
        env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **s3_environment(endpoint),
                   XDG_CACHE_HOME=str(args.work / "xdg"))
        os.environ.update(s3_environment(endpoint))
        import boto3

        bucket = f"lopd-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        for root in (str(local), f"s3://{bucket}/team"):
            rollout = measure([*lopd, "rollout", "--model", str(model), "--prompts", str(prompts), "--max-tokens",
                               str(max_tokens), "--root", root], env, args.interval)
            if rollout["returncode"]:
                raise SystemExit(f"lopd rollout --root {root} failed: {rollout['error']}")
            score = measure([*lopd, "score", "--teacher", str(model), "--rollouts",
                             rollout["output"]["rollout_set"], "--root", root], env, args.interval)
            if score["returncode"]:
                raise SystemExit(f"lopd score --root {root} failed: {score['error']}")
            found[root] = sets_under(root)
            for command, cell in (("rollout", rollout), ("score", score)):
                cells.append({"root": "local" if root == str(local) else "s3 (moto)", "command": command, **cell})
                print(json.dumps(cells[-1]), flush=True)
    results["cells"] = cells
    results["sets"] = found
    results["same_sets"] = len({json.dumps(s, sort_keys=True) for s in found.values()}) == 1
    table = markdown_table(["root", "command", "tree peak GiB", "sum of process peaks GiB", "wall s"],
                           [[c["root"], f"lopd {c['command']}", f"{c['tree_peak_gib']:.2f}",
                             f"{c['sum_of_process_peaks_gib']:.2f}", f"{c['seconds']:.0f}"] for c in cells])
    table += (f"\n\nSame rollout set id, table digest and score shard checksums on both roots: "
              f"{'yes' if results['same_sets'] else 'NO'} ({next(iter(found.values()))['rollout_set']}, "
              f"{next(iter(found.values()))['score_set']}, {next(iter(found.values()))['response_tokens']:,} "
              f"response tokens).")
    finish_results("bucket_root", results, table, t0, args.out, args.quick)


if __name__ == "__main__":
    main()
