"""NSGA-II maths on hand-made points, shape -> plan, and the Ray search on a tiny model with a tiny tokenizer."""

import json

import numpy as np
import pytest
import torch

from minigpt import nsga as N
from minigpt import search as S
from minigpt.config import ConfigError
from minigpt.optconfig import SearchConfig

from tests.conftest import TEXT, make_tiny_pair


# ------------------------------------------------------------------------------------------ pure maths


def test_non_dominated_sort_on_hand_made_points():
    pts = np.array([[1, 5], [2, 3], [3, 4], [4, 1], [5, 5], [2, 3], [6, 6]], dtype=float)
    # [1,5] [2,3] [4,1] and the duplicate [2,3] are non-dominated; [3,4] is beaten by [2,3]; [5,5] by [3,4];
    # [6,6] by everything.
    assert N.fast_non_dominated_sort(pts) == [[0, 1, 3, 5], [2], [4], [6]]
    assert N.dominates(pts[1], pts[2]) and not N.dominates(pts[1], pts[5]) and not N.dominates(pts[0], pts[3])


def test_crowding_distance_on_hand_made_points():
    front = np.array([[0, 10], [1, 6], [3, 3], [10, 0]], dtype=float)
    d = N.crowding_distance(front)
    assert np.isinf(d[0]) and np.isinf(d[3])
    # Point 1: neighbours [0,10] and [3,3] -> (3-0)/10 + (10-3)/10; point 2: neighbours [1,6], [10,0].
    assert d[1] == pytest.approx(0.3 + 0.7)
    assert d[2] == pytest.approx(0.9 + 0.6)
    assert np.all(np.isinf(N.crowding_distance(front[:2])))


def test_survivors_take_whole_fronts_then_the_least_crowded():
    pts = np.array([[0, 10], [1, 6], [3, 3], [10, 0], [2, 9], [11, 11]], dtype=float)
    # Front 0 = points 0-3; with room for 3, the extremes (inf) survive and point 2 (1.5) beats point 1 (1.0).
    assert sorted(N.select_survivors(pts, 3)) == [0, 2, 3]
    assert sorted(N.select_survivors(pts, 5)) == [0, 1, 2, 3, 4]
    rank, crowd = N.rank_and_crowding(pts)
    assert rank.tolist() == [0, 0, 0, 0, 1, 2]


def test_tournament_prefers_rank_then_crowding():
    rng = np.random.default_rng(0)
    rank, crowd = np.array([0, 1]), np.array([0.0, np.inf])
    assert N.tournament(rng, rank, crowd, 5) == [0] * 5
    rank, crowd = np.array([0, 0]), np.array([0.5, 2.0])
    assert N.tournament(rng, rank, crowd, 5) == [1] * 5


def test_operators_respect_the_space():
    space = S.Space(layers=6, mlp_widths=(8, 16, 32), kv_groups=(1, 2), vocab_min_counts=(0, 2), min_layers=2)
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = S.random_genome(rng, space), S.random_genome(rng, space)
        for g in (*N.crossover(rng, a, b, 1.0), S.mutate(rng, a, space, 0.5)):
            assert g[:6].sum() >= 2 and set(g[:6].tolist()) <= {0, 1}
            assert all(0 <= g[6 + i] < n for i, n in enumerate((3, 2, 2)))
    child1, child2 = N.crossover(rng, a, b, 1.0)
    assert np.array_equal(np.sort(np.stack([child1, child2]), 0), np.sort(np.stack([a, b]), 0))
    assert space.shape(space.full()) == S.Shape(tuple(range(6)), 32, 2, 0)


def _toy(space):
    """Deterministic objectives: size grows with kept layers and width; 'loss' falls with them, plus a penalty for
    dropping layer 0 so the front must learn something."""
    def evaluate(genomes):
        out = []
        for g in genomes:
            size = g[:space.layers].sum() * (1 + g[space.layers])
            loss = 10.0 / (1 + size) + (0 if g[0] else 5)
            out.append(([float(size), loss], {}))
        return out
    return evaluate


def test_nsga2_is_reproducible_and_improves():
    space = S.Space(layers=8, mlp_widths=(8, 16, 24, 32), kv_groups=(1,), vocab_min_counts=(0,))
    runs = [S.nsga2(_toy(space), space, population=8, generations=6, seed=s) for s in (7, 7, 8)]
    fronts = [[tuple(p.genome.tolist()) for p in N.pareto_front(pop)] for pop, _ in runs]
    assert fronts[0] == fronts[1]
    assert runs[0][1] == runs[1][1]
    # Elitism: the first objective's best-known loss at each size never gets worse, and layer 0 is kept on the front
    # except at the very smallest sizes.
    pop, history = runs[0]
    assert len(history) == 7 and history[-1]["evaluated"] > history[0]["evaluated"]
    assert all(p.genome[0] == 1 for p in N.pareto_front(pop) if p.objectives[0] > 4)


# ----------------------------------------------------------------------------------------- model helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose vocabulary is a tiny byte-level BPE's, saved with it, and a profile of TEXT."""
    from minigpt import stats

    folder = tmp_path_factory.mktemp("tiny")
    model, tok = make_tiny_pair(layers=4, inter=64, kv_heads=2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    # Profiled on the first sentence only, so the merges of the licence sentence are unseen (a vocabulary cut).
    ids = tok(TEXT.split(".")[0] * 12)["input_ids"]
    blocks = torch.tensor(ids[: (len(ids) // 32) * 32]).view(-1, 32)
    prof = stats.accumulate(model, blocks, batch_size=4)
    return folder, model, tok, prof


def test_plan_from_shape_is_uniform_and_predicted(tiny):
    from minigpt import scoring, slim
    from minigpt.models import count_parameters

    _, model, tok, prof = tiny
    scores = scoring.score_all("contextual", prof, model)
    vocab = S.vocab_keep(prof["token_counts"], tok, 1)
    shape = S.Shape(kept_layers=(0, 2, 3), mlp_width=24, kv_groups=1, vocab_min_count=1)
    plan = S.plan_from_shape(scores, model, shape, domain="d", method="contextual", vocab=vocab)
    assert plan.uniform and plan.mlp_width == 24 and plan.kv_width == 1 and plan.dropped_layers == (1,)
    # The channels kept are the top-scoring ones of each kept layer.
    top = torch.topk(scores.mlp[2], 24).indices.sort().values.tolist()
    assert list(plan.layers[1].mlp_keep) == top
    small = slim.slim(model, plan)
    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
    assert len(vocab) < len(tok)


def test_search_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="split"):
        SearchConfig(split="heldout")
    with pytest.raises(ConfigError, match="population"):
        SearchConfig(population=5)
    with pytest.raises(ConfigError, match="method"):
        SearchConfig(method="depth")


# ------------------------------------------------------------------------------------------- Ray search


@pytest.mark.ray
def test_search_is_seeded_and_every_front_plan_slims_into_a_loadable_model(tiny, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from minigpt import slim
    from minigpt.models import load_tokenizer

    folder, model, tok, prof = tiny
    cfg = SearchConfig(population=6, generations=2, seed=11, eval_blocks=2, batch_size=2, workers=2,
                       cpus_per_worker=1, mlp_fractions=(0.25, 0.5, 1.0), vocab_min_counts=(0, 1))
    texts = [TEXT, TEXT[::-1]]
    a = S.search_domain(prof, folder, texts, cfg, domain="d", block_size=32)
    b = S.search_domain(prof, folder, texts, cfg, domain="d", block_size=32)
    assert [p["shape"] for p in a.front] == [p["shape"] for p in b.front]
    assert [p["bits_per_byte"] for p in a.front] == [p["bits_per_byte"] for p in b.front]
    sizes = [p["params"] for p in a.front]
    bpb = [p["bits_per_byte"] for p in a.front]
    assert sizes == sorted(sizes) and bpb == sorted(bpb, reverse=True)  # a real front: smaller is worse
    assert a.dense["params"] == sum(p.numel() for p in model.parameters())

    dense_tok = load_tokenizer(folder)
    for i, p in enumerate(a.front):
        small, small_tok = slim.slim_expert(model, dense_tok, p["plan"])
        out = slim.save_expert(small, small_tok, tmp_path / f"e{i}")
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert sum(x.numel() for x in loaded.parameters()) == p["params"]
        x = torch.tensor([small_tok(TEXT[:60])["input_ids"]])
        assert torch.allclose(loaded(x).logits, small(x).logits, atol=1e-5)

    path = S.write_front(tmp_path / "search" / "d.json", a)
    data = S.load_front(path)
    assert [q["params"] for q in data["front"]] == sizes and not list((tmp_path / "search").glob(".*"))
    assert S.plot_front(data, tmp_path / "d.png").stat().st_size > 1000
    picked = S.pick(a, points=2)
    assert 1 <= len(picked) <= 2 and all(q.params["total"] in sizes for q in picked)
    budget = S.pick(a, budget=0.99)[0]
    assert budget.params["total"] <= 0.99 * a.dense["params"]
    with pytest.raises(ConfigError, match="budget"):
        S.pick(a, budget=1e-6)
    json.dumps(data)


def test_warm_start_takes_the_given_shapes_first():
    from minigpt.plan import Shape

    space = S.Space(layers=4, mlp_widths=(16, 32, 48, 64), kv_groups=(1, 2), vocab_min_counts=(0,))
    cfg = SearchConfig(population=8)
    # 30 is nearest to 32, and a duplicate shape is taken once.
    shapes = [Shape((0, 1, 3), 30, 1), Shape((0, 1, 3), 30, 1), Shape((0, 1, 2, 3), 64, 2)]
    init = S._initial(space, cfg, shapes)
    assert [list(g) for g in init[:2]] == [[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 3, 1, 0]]
    assert len(init) == cfg.population // 2 - 1 and all(space.shape(g).kv_groups == 2 for g in init[2:])
    assert space.shape(init[0]) == Shape((0, 1, 3), 32, 1)


def test_search_scores_candidates_as_compensated_experts(tiny, ray_local):
    """With reconstruct, every candidate is refit from the profile's Gram statistics before it is scored, so the
    front ranks the experts that will be built (a plain slice of the same plan scores differently)."""
    import dataclasses

    from minigpt import stats
    from minigpt.models import load_tokenizer
    from minigpt.plan import Shape

    folder, model, tok, _ = tiny
    ids = tok(TEXT * 4)["input_ids"]
    prof = stats.accumulate(model, torch.tensor(ids[: (len(ids) // 32) * 32]).view(-1, 32), batch_size=4,
                            spec=stats.StatSpec(gram=True))
    cfg = SearchConfig(population=4, generations=1, seed=3, eval_blocks=2, batch_size=2, workers=1,
                       cpus_per_worker=1, mlp_fractions=(0.25, 0.5, 1.0), kv=False)
    texts = [TEXT, TEXT[::-1]]
    res = S.search_domain(prof, folder, texts, cfg, domain="d", block_size=32, reconstruct=True, damp=0.01,
                          initial=[Shape((0, 1, 2, 3), 16, 2)])
    point = next(p for p in res.front if p["plan"].mlp_width < 64)
    assert point["plan"].reconstruct
    kw = dict(block_size=32, batch_size=2, max_blocks=2)
    torch.set_num_threads(1)
    dense_tok = load_tokenizer(folder)
    refit_bpb = S.evaluate_plan(model, dense_tok, point["plan"], texts, stats=prof, **kw)["bits_per_byte"]
    plain = dataclasses.replace(point["plan"], reconstruct=False)
    plain_bpb = S.evaluate_plan(model, dense_tok, plain, texts, **kw)["bits_per_byte"]
    assert point["bits_per_byte"] == pytest.approx(refit_bpb, rel=1e-5)
    assert abs(refit_bpb - plain_bpb) > 1e-3
