"""Engine replicas on a Ray cluster: one Ray actor per vLLM engine, work items handed out by Ray's ActorPool.

Users who outgrow one machine already run Ray (verl, OpenRLHF, NeMo-RL place vLLM engines as Ray actors), so lopd
uses Ray's own primitives and adds no scheduler of its own:
- each replica is an actor in its own placement group, one bundle holding the engine's devices (a
  `tensor_parallel_size=4` engine reserves 4 GPUs on one node; vLLM's multiprocessing executor then runs inside
  the actor, the set-up vLLM recommends for TP inside a Ray actor), or one CPU on a CPU cluster;
- `ray.util.ActorPool` hands the items out, one at a time, to whichever replica is free;
- a replica that dies (node lost, process killed) is restarted by Ray (`max_restarts`), and the item it was
  working on is retried (`max_task_retries`), on whichever node Ray places the new replica. Items must therefore
  be idempotent: the score-set writer's shard claim makes a retried shard rewrite itself cleanly.
The driver connects to `address`, else `$RAY_ADDRESS`, else starts a local cluster, and shuts down only a
cluster it started.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lopd.engine import on_cpu
from lopd.errors import LopdError

REPLICA_RESTARTS = 2  # per replica; a replica that keeps dying on the same item fails the command
PLACEMENT_TIMEOUT_S = 600
CLOSE_TIMEOUT_S = 60


@dataclass(frozen=True)
class RayPlacement:
    """Where a stage's engines run: `replicas` Ray actors on the cluster at `address` (None: `$RAY_ADDRESS`, else a
    local cluster)."""

    replicas: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise LopdError(f"--replicas must be at least 1, got {self.replicas}")


def replica_bundle(engine_args: Mapping[str, Any]) -> dict[str, float]:
    """The resources one replica reserves: its engine's GPUs (tensor x pipeline parallel) and a CPU, or one CPU."""
    if on_cpu():
        return {"CPU": 1}
    gpus = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
    return {"CPU": 1, "GPU": gpus}


def replica_devices(engine_args: Mapping[str, Any], replicas: int) -> tuple[str, int]:
    """The ledger's device kind and count for a stage run on `replicas` replicas: what their bundles reserve (the
    driver may have no GPU, so a GPU replica is recorded as `cuda`, without its model name)."""
    bundle = replica_bundle(engine_args)
    return ("cuda", int(bundle["GPU"]) * replicas) if "GPU" in bundle else ("cpu", int(bundle["CPU"]) * replicas)


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Connected to the cluster for the block; a local cluster this process started is shut down after it."""
    try:
        import ray
    except ImportError as error:
        raise LopdError("--ray needs Ray: pip install 'lopd[ray]'") from error
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def start_replicas(actor_class: type, init_args: tuple, bundle: dict[str, float], count: int,
                   name: str) -> tuple[list, list]:
    """`count` actors of `actor_class`, each in its own ready placement group, and the groups; actors are named
    `<name>-<i>` so that operators (and tests) can find them with `ray.get_actor`."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(max_restarts=REPLICA_RESTARTS, max_task_retries=-1)(actor_class)
    groups = [placement_group([bundle]) for _ in range(count)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=count, timeout=PLACEMENT_TIMEOUT_S)
    if len(ready) < count:
        for group in groups:
            ray.util.remove_placement_group(group)
        raise LopdError(f"the Ray cluster has room for {len(ready)} of {count} replicas of {bundle} after "
                        f"{PLACEMENT_TIMEOUT_S} s (free: {ray.available_resources()}); lower --replicas or add nodes")
    actors = [remote.options(name=f"{name}-{i}", num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                             scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group))
              .remote(*init_args) for i, group in enumerate(groups)]
    return actors, groups


def run_on_replicas(placement: RayPlacement, actor_class: type, init_args: tuple, bundle: dict[str, float],
                    items: Iterable[Any], on_result: Callable[[Any], None], name: str) -> None:
    """Call `actor_class(*init_args).run(item)` for every item on `placement.replicas` replicas (the class also has
    `close()`, which stops its engine), passing each result to `on_result` as it arrives (in any order). The replicas and their placement groups are removed when
    the work is done or has failed; a killed replica's engine processes follow it (lopd.engine's watchdog)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util import ActorPool

    with ray_cluster(placement.address):
        actors, groups = start_replicas(actor_class, init_args, bundle, placement.replicas, f"{name}-{os.getpid()}")
        try:
            pool = ActorPool(actors)
            for result in pool.map_unordered(lambda actor, item: actor.run.remote(item), list(items)):
                on_result(result)
        except RayActorError as error:
            raise LopdError(f"a replica died {REPLICA_RESTARTS + 1} times ({error.__class__.__name__}); rerun the "
                            "same command: committed work is kept") from error
        finally:
            closing = [actor.close.remote() for actor in actors]  # stop each engine cleanly where it still runs
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
            for actor in actors:
                ray.kill(actor, no_restart=True)
            for group in groups:
                ray.util.remove_placement_group(group)
