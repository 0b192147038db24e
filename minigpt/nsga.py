"""NSGA-II (Deb et al. 2002) as pure numpy on a seeded Generator, for any genome and any objectives to minimise.

Non-dominated sorting, crowding distance, environmental selection, binary tournaments and uniform crossover are
general; what a genome means (its random draw and its mutation) is passed in by the caller (minigpt.search: expert
shapes). Tested on hand-made points in tests/test_search.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a Pareto-dominates b: no worse in every objective and strictly better in one (all minimised)."""
    return bool(np.all(a <= b) and np.any(a < b))


def fast_non_dominated_sort(objectives: np.ndarray) -> list[list[int]]:
    """Deb et al. 2002: indices of the points grouped into fronts, best (non-dominated) first; each front sorted."""
    f = np.asarray(objectives, dtype=np.float64)
    n = len(f)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # points that i dominates
    count = np.zeros(n, dtype=np.int64)  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(f[i], f[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(f[j], f[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts = [[i for i in range(n) if count[i] == 0]]
    while fronts[-1]:
        nxt = []
        for i in fronts[-1]:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        fronts.append(sorted(nxt))
    return fronts[:-1]


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """Crowding distance of the points of one front: per objective, the normalised gap between each point's two
    neighbours, summed; the extreme points of every objective get infinity so they always survive."""
    f = np.asarray(objectives, dtype=np.float64)
    n, m = f.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(f[:, k], kind="stable")
        lo, hi = f[order[0], k], f[order[-1], k]
        dist[order[0]] = dist[order[-1]] = np.inf
        if hi == lo:
            continue
        gaps = (f[order[2:], k] - f[order[:-2], k]) / (hi - lo)
        dist[order[1:-1]] += gaps
    return dist


def rank_and_crowding(objectives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Front number (0 = non-dominated) and crowding distance within its front, for every point."""
    n = len(objectives)
    rank = np.zeros(n, dtype=np.int64)
    crowd = np.zeros(n)
    for r, front in enumerate(fast_non_dominated_sort(objectives)):
        rank[front] = r
        crowd[front] = crowding_distance(np.asarray(objectives)[front])
    return rank, crowd


def select_survivors(objectives: np.ndarray, n: int) -> list[int]:
    """NSGA-II environmental selection: whole fronts in rank order, the last one cut by largest crowding distance
    (ties by index, so the selection is deterministic)."""
    chosen: list[int] = []
    for front in fast_non_dominated_sort(objectives):
        if len(chosen) + len(front) <= n:
            chosen += front
            continue
        crowd = crowding_distance(np.asarray(objectives)[front])
        order = sorted(range(len(front)), key=lambda i: (-crowd[i], front[i]))
        chosen += [front[i] for i in order[:n - len(chosen)]]
        break
    return chosen


def tournament(rng: np.random.Generator, rank: np.ndarray, crowd: np.ndarray, k: int) -> list[int]:
    """k binary tournaments: the lower rank wins, then the larger crowding distance, then a coin flip."""
    winners = []
    for _ in range(k):
        a, b = (int(x) for x in rng.choice(len(rank), size=2, replace=False))
        if rank[a] != rank[b]:
            winners.append(a if rank[a] < rank[b] else b)
        elif crowd[a] != crowd[b]:
            winners.append(a if crowd[a] > crowd[b] else b)
        else:
            winners.append(a if rng.random() < 0.5 else b)
    return winners


def crossover(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform crossover with probability `prob` (else the parents are copied)."""
    if rng.random() >= prob:
        return a.copy(), b.copy()
    swap = rng.random(len(a)) < 0.5
    return np.where(swap, b, a), np.where(swap, a, b)


@dataclass
class Individual:
    genome: np.ndarray
    objectives: np.ndarray
    info: dict = field(default_factory=dict)


def nsga2(evaluate: Callable[[list[np.ndarray]], list[tuple[Sequence[float], dict]]], *, population: int,
          generations: int, seed: int, random_genome: Callable[[np.random.Generator], np.ndarray],
          mutate: Callable[[np.random.Generator, np.ndarray], np.ndarray], initial: Sequence[np.ndarray] = (),
          crossover_prob: float = 0.9,
          on_generation: Callable[[int, list[Individual]], None] | None = None) -> tuple[list[Individual], list]:
    """Run NSGA-II. `evaluate` takes a batch of new genomes and returns, per genome, (objectives to minimise, info).

    The initial population holds the `initial` genomes (a warm start) and random genomes. Each generation makes
    `population` children by tournament, uniform crossover and `mutate`, and keeps the best `population` of parents
    + children. A genome is evaluated once (a cache keyed by the genome), so a seed reproduces the whole run as long
    as `evaluate` is deterministic. Returns (final population, history of every generation).
    """
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], Individual] = {}

    def key(g: np.ndarray) -> tuple[int, ...]:
        return tuple(int(x) for x in g)

    def run(genomes: list[np.ndarray]) -> list[Individual]:
        new = list({key(g): g for g in genomes if key(g) not in cache}.values())
        for g, (obj, info) in zip(new, evaluate(new) if new else []):
            cache[key(g)] = Individual(g, np.asarray(obj, dtype=np.float64), info)
        return [cache[key(g)] for g in genomes]

    start = [np.asarray(g, dtype=np.int64) for g in initial][:population]
    start += [random_genome(rng) for _ in range(population - len(start))]
    pop = run(start)
    history = []

    def record(gen: int) -> None:
        objs = np.stack([p.objectives for p in pop])
        front = [pop[i] for i in fast_non_dominated_sort(objs)[0]]
        history.append({"generation": gen, "evaluated": len(cache),
                        "front": sorted([[float(x) for x in p.objectives] for p in front])})
        if on_generation is not None:
            on_generation(gen, pop)

    record(0)
    for gen in range(1, generations + 1):
        rank, crowd = rank_and_crowding(np.stack([p.objectives for p in pop]))
        parents = tournament(rng, rank, crowd, population)
        children = []
        for i in range(0, population, 2):
            a, b = crossover(rng, pop[parents[i]].genome, pop[parents[i + 1]].genome, crossover_prob)
            children += [mutate(rng, a), mutate(rng, b)]
        union = pop + run(children)
        # The same genome may be both parent and child; keep one copy so duplicates do not crowd the front.
        unique = list({key(p.genome): p for p in union}.values())
        objs = np.stack([p.objectives for p in unique])
        pop = [unique[i] for i in select_survivors(objs, min(population, len(unique)))]
        record(gen)
    return pop, history


def pareto_front(individuals: Sequence[Individual]) -> list[Individual]:
    """The non-dominated individuals, sorted by the first objective then the second."""
    objs = np.stack([p.objectives for p in individuals])
    front = [individuals[i] for i in fast_non_dominated_sort(objs)[0]]
    return sorted(front, key=lambda p: tuple(p.objectives))


__all__ = ["Individual", "crossover", "crowding_distance", "dominates", "fast_non_dominated_sort", "nsga2",
           "pareto_front", "rank_and_crowding", "select_survivors", "tournament"]
