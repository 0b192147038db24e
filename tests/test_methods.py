"""What each scoring method ranks, checked against its definition on a tiny model or crafted statistics."""

import pytest
import torch

from minigpt import plan as P, scoring, stats as S
from minigpt.config import ConfigError, PruneConfig
from tests.conftest import make_tiny_llama


def _blocks(seed=1, n=4, t=16, hi=128):
    return torch.randint(0, hi, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def prof(model):
    return S.accumulate(model, _blocks(), batch_size=2)


def test_contextual_threshold_mode_keeps_the_mean_survivor_count(model, prof):
    scores = scoring.contextual(prof, model).mlp
    plan = P.build_plan(prof, model, PruneConfig(method="contextual", mode="threshold", threshold=1.0, multiple_of=4), domain="d")
    survivors = (scores >= scores.mean(1, keepdim=True)).sum(1).double().mean()
    assert plan.mlp_width == max(4, round(float(survivors) / 4) * 4)
    assert plan.threshold == 1.0 and plan.mode == "threshold"
    higher = P.build_plan(prof, model, PruneConfig(method="contextual", mode="threshold", threshold=1.5, multiple_of=4), domain="d")
    assert higher.mlp_width <= plan.mlp_width


def test_contextual_groups_score_by_head_rms(model, prof):
    kv = scoring.contextual(prof, model).kv
    rms = (prof["head_sq_sum"] / prof["tokens"]).sqrt()
    torch.testing.assert_close(kv, rms.reshape(3, 2, 2).sum(-1))


def test_cus_prun_prunes_what_only_other_corpora_use(model, prof):
    mine, other = {k: v.clone() for k, v in prof.items()}, {k: v.clone() for k, v in prof.items()}
    t = prof["tokens"]
    mine["mlp_abs_sum"][:] = t  # every channel equally relevant (1.0) to the domain...
    mine["mlp_abs_sum"][0, 5] = 1.5 * t  # ...channel 5 a bit more,
    other["mlp_abs_sum"][:] = t
    other["mlp_abs_sum"][0, 7] = 40 * t  # channel 7 serves the other corpus far more than this domain
    s = scoring.cus_prun(mine, model, others={"o": other}).mlp
    assert int(s[0].argmin()) == 7 and int(s[0].argmax()) == 5
    assert float(scoring.contextual(mine, model).mlp[0, 7]) == pytest.approx(1.0)  # contextual alone cannot tell
    with pytest.raises(ConfigError, match="other corpora"):
        scoring.cus_prun(mine, model, others={})


def test_taylor_sums_match_autograd(model):
    blocks = _blocks(n=2)
    grad = S.taylor_sums(model, blocks, batch_size=2)
    m = make_tiny_llama()
    m(input_ids=blocks, labels=blocks).loss.backward()
    mlp = m.model.layers[1].mlp
    with torch.no_grad():
        j = 9
        expect = sum(float((p.weight[j] * p.weight.grad[j]).abs().sum()) for p in (mlp.gate_proj, mlp.up_proj))
        expect += float((mlp.down_proj.weight[:, j] * mlp.down_proj.weight.grad[:, j]).abs().sum())
        assert float(grad["taylor_mlp"][1, j]) == pytest.approx(expect, rel=1e-5)
        att = m.model.layers[0].self_attn  # group 1 = k/v rows 8..15, query heads 2,3 = rows/cols 16..31
        expect = sum(float((p.weight[r] * p.weight.grad[r]).abs().sum())
                     for p, r in ((att.k_proj, slice(8, 16)), (att.v_proj, slice(8, 16)), (att.q_proj, slice(16, 32))))
        expect += float((att.o_proj.weight[:, 16:32] * att.o_proj.weight.grad[:, 16:32]).abs().sum())
    assert float(grad["taylor_kv"][0, 1]) == pytest.approx(expect, rel=1e-5)
    assert grad["taylor_batches"].item() == 1 and all(p.grad is None for p in model.parameters())
    t = scoring.taylor(S.accumulate(model, blocks, 2), model, grad=grad)
    torch.testing.assert_close(t.mlp, grad["taylor_mlp"])
    with pytest.raises(ConfigError, match="taylor_sums"):
        scoring.taylor(S.accumulate(model, blocks, 2), model, grad=None)


def test_wanda_sp_and_magnitude_follow_their_formulas(model, prof):
    down = model.model.layers[2].mlp.down_proj.weight.double()
    rms = (prof["mlp_sq_sum"][2] / prof["tokens"]).sqrt()
    torch.testing.assert_close(scoring.wanda_sp(prof, model).mlp[2], down.abs().sum(0) * rms)
    mlp = model.model.layers[2].mlp
    sq = (mlp.gate_proj.weight.double().square().sum(1) + mlp.up_proj.weight.double().square().sum(1)
          + down.square().sum(0))
    torch.testing.assert_close(scoring.magnitude(prof, model).mlp[2], sq.sqrt())


def test_flap_is_input_variance_times_squared_output_weights(model):
    """FLAP's WIFV against a direct computation: each output projection's input captured by a hook, its variance
    over every token, times the column's sum of squares; a query head averages its columns, a KV group sums its
    heads. The sequential path (one layer's statistics) gives that layer's row."""
    blocks = _blocks()
    prof = S.accumulate(model, blocks, batch_size=2, spec=S.StatSpec(gram=True))
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, key=key: seen.setdefault(key, []).append(a[0].reshape(
        -1, a[0].shape[-1]).double())) for i, layer in enumerate(model.model.layers)
        for key, m in ((f"mlp{i}", layer.mlp.down_proj), (f"attn{i}", layer.self_attn.o_proj))]
    with torch.no_grad():
        model.model(input_ids=blocks)
    for h in hooks:
        h.remove()
    got = scoring.flap(prof, model)
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(seen[f"mlp{i}"])
        ref = x.var(0, unbiased=False) * layer.mlp.down_proj.weight.double().square().sum(0)
        torch.testing.assert_close(got.mlp[i], ref, rtol=1e-5, atol=1e-9)  # E[x^2] - E[x]^2 against var()
        a = torch.cat(seen[f"attn{i}"])
        col = a.var(0, unbiased=False) * layer.self_attn.o_proj.weight.double().square().sum(0)
        per_head = col.reshape(4, 8).mean(-1)  # 4 heads of 8
        torch.testing.assert_close(got.q[i], per_head, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got.kv[i], per_head.reshape(2, 2).sum(-1), rtol=1e-5, atol=1e-9)
    one = scoring.score_all("flap", S.layer_view({k: v[1:2] if v.dim() >= 2 else v for k, v in prof.items()}, 1, 3),
                            model, layers=[1])
    torch.testing.assert_close(one.mlp[1], got.mlp[1])
    assert not one.mlp[0].any() and not one.mlp[2].any()
    with pytest.raises(Exception, match="flap needs the profile's Gram statistics"):
        scoring.flap(S.accumulate(model, blocks, batch_size=2), model)


def test_random_is_seeded(model, prof):
    a, b = scoring.random(prof, model, seed=1).mlp, scoring.random(prof, model, seed=1).mlp
    assert torch.equal(a, b) and not torch.equal(a, scoring.random(prof, model, seed=2).mlp)


def test_depth_drops_the_most_similar_layers(model, prof):
    p = dict(prof)
    p["block_cos_sum"] = torch.tensor([0.2, 0.95, 0.5], dtype=torch.float64) * prof["tokens"]
    plan = P.build_plan(p, model, PruneConfig(method="depth", target=0.3, reconstruct=False), domain="d")
    assert plan.dropped_layers == (1,) and [lp.index for lp in plan.layers] == [0, 2]
    assert plan.mlp_width == 64


def test_kv_groups_and_target_combine(model, prof):
    plan = P.build_plan(prof, model, PruneConfig(method="contextual", target=0.4, kv_groups=1), domain="d")
    assert plan.kv_width == 1 and all(len(lp.kv_keep) == 1 for lp in plan.layers)
    assert P.removed_fraction(plan) == pytest.approx(0.4, abs=0.06)
    with pytest.raises(ConfigError, match="exceeds the model's 2 KV groups"):
        P.build_plan(prof, model, PruneConfig(method="contextual", kv_groups=3), domain="d")


@pytest.mark.parametrize("bad, match", [({"mode": "cut"}, "prune.mode"), ({"method": "sparsegpt"}, "prune.method"),
                                        ({"kv_groups": -1}, "kv_groups"), ({"method": "depth", "mode": "threshold"},
                                                                           "depth")])
def test_prune_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**bad)


def test_protected_layers_are_an_explicit_non_stock_opt_in(model, prof):
    import copy

    from minigpt import slim

    plan = P.build_plan(prof, model, PruneConfig(method="contextual", target=0.15), domain="d", protect_layers=(0, -1))
    assert [len(lp.mlp_keep) for lp in plan.layers][::2] == [64, 64] and len(plan.layers[1].mlp_keep) < 64
    assert not plan.uniform and P.removed_fraction(plan) == pytest.approx(0.15, abs=0.03)
    with pytest.raises(ConfigError, match="not a stock 'llama' config"):
        slim.slim(model, plan)
    masked = slim.mask(copy.deepcopy(model), plan)  # the evaluation path for such plans
    assert (masked.model.layers[1].mlp.down_proj.weight == 0).all(0).sum() == 64 - len(plan.layers[1].mlp_keep)


def test_query_heads_are_pruned_evenly_inside_kv_groups(model, prof):
    from minigpt import slim

    plan = P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.3, q_heads=1, reconstruct=False), domain="d")
    rms = (prof["head_sq_sum"] / prof["tokens"]).sqrt()
    wanda = scoring.score_all(PruneConfig(method="wanda-sp", target=0.3, q_heads=1, reconstruct=False), prof, model)
    for lp in plan.layers:  # 4 heads in 2 groups: each group keeps its stronger head (wanda-sp scores)
        assert len(lp.q_keep) == 2 and {h // 2 for h in lp.q_keep} == {0, 1}
        assert all(wanda.q[lp.index, h] > wanda.q[lp.index, h ^ 1] for h in lp.q_keep)
    assert plan.q_width == 1 and plan.kv_width is None and plan.uniform
    small = slim.slim(model, plan)
    assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 2
    assert small.config.head_dim == 8
    out = small.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    ctx = P.build_plan(prof, model, PruneConfig(method="contextual", target=0.3, q_heads=1, reconstruct=False),
                       domain="d")
    for lp in ctx.layers:
        assert all(rms[lp.index, h] >= rms[lp.index, h ^ 1] for h in lp.q_keep)
    with pytest.raises(ConfigError, match="no query-head scores"):
        P.build_plan(prof, model, PruneConfig(method="taylor", target=0.3, q_heads=1, reconstruct=False),
                     domain="d", grad_stats=S.taylor_sums(model, _blocks(n=2), 2))
    with pytest.raises(ConfigError, match="exceeds the model's 2 query heads"):
        P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.3, q_heads=3, reconstruct=False), domain="d")
