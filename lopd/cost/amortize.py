"""Who pays for what: device time per experiment and stage, with shared artifacts amortised.

The consumption graph. A ledger row whose `artifact` is set and `cache_hit` is false *produces* that
artifact: its device seconds are (part of) the artifact's production cost. An experiment *uses* an
artifact when one of its rows produces it, reuses it (a cache-hit row naming it) or lists it in
`inputs`, and also, transitively, when it uses anything derived from it: a row for artifact B that
lists A in `inputs` derives B from A, so training on score set S uses the rollout set R that S scored.

Two views of the same rows:
- shared: each artifact's production cost is split equally among the experiments that use it, so
  the experiments that reuse a teacher cache pay their part of it;
- marginal: every row is charged to its own experiment, so reuse is free and the producer pays all.
Rows without an artifact (e.g. eval) are charged to their own experiment in both views. Failed rows
(extra.failed) cost what they spent, like any other.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from lopd.errors import LopdError

Row = Mapping[str, Any]
VIEWS = ("shared", "marginal")
GROUPINGS = ("method", "stage", "experiment")
# Stages whose `tokens` are trained tokens, the denominator of cost per million tokens.
TRAIN_STAGES = frozenset({"sft", "train"})
STAGE_ORDER = ("rollout", "score", "sft", "train", "eval")


def stage_sort_key(stage: str) -> tuple[int, str]:
    """Pipeline order for the known stages, then the others alphabetically."""
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


@dataclass(frozen=True)
class Artifact:
    id: str
    stage: str  # the stage of the first row naming it
    device_seconds: float  # production cost: its rows that were not cache hits
    producers: tuple[str, ...]  # experiments that paid for it (empty if produced outside the ledger)
    users: tuple[str, ...]  # experiments that use it, directly or through derived artifacts


def artifacts(rows: Iterable[Row]) -> dict[str, Artifact]:
    """Every artifact named by a row's `artifact`, with its cost, producers and (transitive) users."""
    direct: dict[str, dict[str, None]] = defaultdict(dict)  # insertion-ordered sets
    derived: dict[str, set[str]] = defaultdict(set)  # artifact -> artifacts made from it
    producers: dict[str, dict[str, None]] = defaultdict(dict)
    cost: dict[str, float] = defaultdict(float)
    stage: dict[str, str] = {}
    for row in rows:
        experiment, artifact = row["experiment"], row["artifact"]
        for source in row["inputs"]:
            direct[source][experiment] = None
            if artifact:
                derived[source].add(artifact)
        if artifact:
            direct[artifact][experiment] = None
            stage.setdefault(artifact, row["stage"])
            if not row["cache_hit"]:
                producers[artifact][experiment] = None
                cost[artifact] += row["device_seconds"]

    def users(artifact: str) -> tuple[str, ...]:
        found: dict[str, None] = {}
        seen, todo = {artifact}, [artifact]
        while todo:
            current = todo.pop()
            found.update(direct[current])
            todo.extend(derived[current] - seen)
            seen |= derived[current]
        return tuple(found)

    return {a: Artifact(a, stage[a], cost[a], tuple(producers[a]), users(a)) for a in stage}


def experiment_methods(rows: Iterable[Row]) -> dict[str, str]:
    """An experiment's method: the methods of its training rows (joined by "+"), else of any row.

    Rollout and score rows may name a recipe rather than a loss; users compare experiments by the
    loss they trained with.
    """
    experiments: dict[str, None] = {}
    trained: dict[str, dict[str, None]] = defaultdict(dict)
    other: dict[str, dict[str, None]] = defaultdict(dict)
    for row in rows:
        experiments[row["experiment"]] = None
        if row["method"]:
            (trained if row["stage"] in TRAIN_STAGES else other)[row["experiment"]][row["method"]] = None
    return {e: "+".join(trained[e] or other[e]) for e in experiments}


def experiment_accuracy(rows: Iterable[Row]) -> dict[str, float]:
    """Best `extra["accuracy"]` of each evaluated experiment (it reached that accuracy once)."""
    best: dict[str, float] = {}
    for row in rows:
        value = row["extra"].get("accuracy")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LopdError(f"ledger row {row.get('id')} has a non-numeric extra.accuracy {value!r}")
        best[row["experiment"]] = max(float(value), best.get(row["experiment"], float("-inf")))
    return best


class _Costed:
    shared_device_seconds: float
    marginal_device_seconds: float

    def device_seconds(self, view: str) -> float:
        return getattr(self, f"{view}_device_seconds")


@dataclass(frozen=True)
class CostRow(_Costed):
    """Device seconds one experiment pays for one stage under each view; `tokens` are its own."""

    experiment: str
    method: str
    stage: str
    shared_device_seconds: float
    marginal_device_seconds: float
    tokens: int


def amortize(rows: Sequence[Row]) -> list[CostRow]:
    """Tidy cost rows, one per (experiment, stage) that has rows or a share of a used artifact."""
    shared_by: dict[str, Artifact] = artifacts(rows)
    shared: dict[tuple[str, str], float] = defaultdict(float)
    marginal: dict[tuple[str, str], float] = defaultdict(float)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        key = (row["experiment"], row["stage"])
        marginal[key] += row["device_seconds"]
        tokens[key] += row["tokens"]
        payers = shared_by[row["artifact"]].users if row["artifact"] else (row["experiment"],)
        for payer in payers:
            shared[(payer, row["stage"])] += row["device_seconds"] / len(payers)
    methods = experiment_methods(rows)
    keys = sorted(shared.keys() | marginal.keys(), key=lambda k: (k[0], stage_sort_key(k[1])))
    return [CostRow(e, methods[e], s, shared[(e, s)], marginal[(e, s)], tokens[(e, s)]) for e, s in keys]


@dataclass(frozen=True)
class Group(_Costed):
    """Costs summed over the experiments or stages sharing one `key`."""

    key: str
    experiments: int
    shared_device_seconds: float
    marginal_device_seconds: float
    trained_tokens: int

    def per_million_tokens(self, view: str) -> float | None:
        """Device seconds per million trained tokens; None when the group trained on none."""
        return self.device_seconds(view) * 1e6 / self.trained_tokens if self.trained_tokens else None


def total(costs: Iterable[CostRow], key: str = "total") -> Group:
    costs = list(costs)
    return Group(
        key,
        len({c.experiment for c in costs}),
        sum(c.shared_device_seconds for c in costs),
        sum(c.marginal_device_seconds for c in costs),
        sum(c.tokens for c in costs if c.stage in TRAIN_STAGES),
    )


def aggregate(costs: Iterable[CostRow], by: str) -> list[Group]:
    """Costs summed by "method", "stage" or "experiment", in a stable order."""
    if by not in GROUPINGS:
        raise LopdError(f"cannot group costs by {by!r}; choose one of {', '.join(GROUPINGS)}")
    buckets: dict[str, list[CostRow]] = defaultdict(list)
    for cost in costs:
        buckets[getattr(cost, by)].append(cost)
    order = stage_sort_key if by == "stage" else None
    return [total(buckets[key], key) for key in sorted(buckets, key=order)]


def best_accuracy(costs: Iterable[CostRow], accuracy: Mapping[str, float], by: str) -> dict[str, float]:
    """Best accuracy of the evaluated experiments in each method or experiment group."""
    best: dict[str, float] = {}
    for cost in costs:
        key = getattr(cost, by)
        if cost.experiment in accuracy:
            best[key] = max(accuracy[cost.experiment], best.get(key, float("-inf")))
    return best


@dataclass(frozen=True)
class TargetResult:
    """The cheapest experiment (shared view) of a method that reached the target accuracy.

    When none did, `experiment` and `shared_device_seconds` are None and `accuracy` is the method's
    best, so the user sees how far it fell short.
    """

    method: str
    experiment: str | None
    accuracy: float
    shared_device_seconds: float | None


def cost_to_target(costs: Sequence[CostRow], accuracy: Mapping[str, float], target: float) -> list[TargetResult]:
    """One result per method with at least one evaluated experiment."""
    if not accuracy:
        raise LopdError("cost to a target accuracy needs eval rows with extra.accuracy; the ledger has none")
    spent = {g.key: g.shared_device_seconds for g in aggregate(costs, "experiment")}
    by_method: dict[str, set[str]] = defaultdict(set)
    for cost in costs:
        if cost.experiment in accuracy:
            by_method[cost.method].add(cost.experiment)
    results = []
    for method in sorted(by_method):
        reached = [e for e in by_method[method] if accuracy[e] >= target]
        if reached:
            cheapest = min(reached, key=lambda e: (spent[e], e))
            results.append(TargetResult(method, cheapest, accuracy[cheapest], spent[cheapest]))
        else:
            results.append(TargetResult(method, None, max(accuracy[e] for e in by_method[method]), None))
    return results
