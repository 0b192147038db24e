"""Least-squares compensation, structured OBS and depth replacement against their closed forms (minigpt.refit)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from minigpt import plan as P, refit, scoring, slim as SL, stats as S
from minigpt.config import ConfigError, PruneConfig
from minigpt.models import count_parameters
from tests.conftest import make_tiny_llama

GRAM = S.StatSpec(gram=True)


def _blocks(n=6, t=16, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def prof(model):
    return S.accumulate(model, _blocks(), batch_size=2, spec=S.StatSpec(gram=True, depth_spans=(1, 2)))


def _random_problem(d=5, m=12, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    W = torch.randn(d, m, generator=g, dtype=torch.float64)
    return W, X


def test_gram_statistics_match_direct_computation(model):
    blocks = _blocks(2)
    seen = {}
    layer = model.model.layers[1]
    h1 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(mlp=a[0].detach()))
    h2 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(attn=a[0].detach()))
    st = S.accumulate(model, blocks, batch_size=2, spec=GRAM)
    h1.remove(), h2.remove()
    for key, x in (("mlp", seen["mlp"]), ("attn", seen["attn"])):
        x = x.double().reshape(-1, x.shape[-1])
        torch.testing.assert_close(st[f"{key}_gram"][1], x.T @ x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st[f"{key}_sum"][1], x.sum(0), rtol=1e-6, atol=1e-8)
    assert S.spec_of(st) == GRAM and S.stats_bytes(model, GRAM) == 8 * sum(v.numel() for v in st.values())


def test_gram_and_depth_sums_merge_exactly(model):
    spec = S.StatSpec(gram=True, depth_spans=(2,))
    blocks = _blocks(8)
    whole = S.accumulate(model, blocks, batch_size=2, spec=spec)
    merged = S.merge(reversed([S.accumulate(model, blocks[i:i + 2], batch_size=2, spec=spec) for i in (0, 2, 4, 6)]))
    assert set(merged) == set(whole) and "depth_cross_2" in whole and "attn_gram" in whole
    for k in whole:
        torch.testing.assert_close(merged[k], whole[k], rtol=1e-9, atol=1e-9)


def test_keeping_every_input_returns_the_original_weights():
    W, X = _random_problem()
    G = X.T @ X
    out, _ = refit.ridge_refit(W, G, range(12), damp=0.01)
    torch.testing.assert_close(out, W, rtol=1e-6, atol=1e-6)
    b = torch.randn(5, dtype=torch.float64)
    out, nb = refit.ridge_refit(W, G, range(12), 0.01, bias=b, x_sum=X.sum(0), count=200)
    torch.testing.assert_close(out, W, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nb, b, rtol=1e-6, atol=1e-6)


def test_refit_is_exact_when_removed_inputs_are_combinations_of_kept_ones():
    W, X = _random_problem()
    X[:, 9] = 0.5 * X[:, 0] - 2.0 * X[:, 3]
    X[:, 11] = X[:, 1] + X[:, 2]
    keep = [i for i in range(12) if i not in (9, 11)]
    out, _ = refit.ridge_refit(W, X.T @ X, keep, damp=0.0)
    torch.testing.assert_close(X[:, keep] @ out.T, X @ W.T, rtol=1e-8, atol=1e-8)
    # Without the refit the same cut loses the removed inputs' contribution.
    assert (X[:, keep] @ W[:, keep].T - X @ W.T).abs().max() > 0.1


def test_refit_fits_the_bias_as_a_constant_input():
    W, X = _random_problem()
    X[:, 7] = 3.0  # a constant input: removing it is exactly compensated by the bias
    b = torch.randn(5, dtype=torch.float64)
    keep = [i for i in range(12) if i != 7]
    out, nb = refit.ridge_refit(W, X.T @ X, keep, 0.0, bias=b, x_sum=X.sum(0), count=X.shape[0])
    torch.testing.assert_close(X[:, keep] @ out.T + nb, X @ W.T + b, rtol=1e-8, atol=1e-8)


def test_stream_correction_is_the_least_squares_fit_to_the_dense_stream():
    """refit.corrected: W x + b + e is the target (e: the stream's error, not a linear function of x); with no
    ridge the result is the ordinary least-squares fit of [x, 1] to it, and with no error it is W itself."""
    W, X = _random_problem(d=5, m=12, n=300)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    e = torch.randn(300, 5, generator=g, dtype=torch.float64) + X[:, :5] ** 2  # a non-linear error
    G, E = X.T @ X, e.T @ X
    Y = X @ W.T + b + e
    fit, fb = refit.corrected(W, G, E, 0.0, bias=b, x_sum=X.sum(0), count=300, e_sum=e.sum(0))
    ls = torch.linalg.lstsq(torch.cat([X, torch.ones(300, 1, dtype=X.dtype)], 1), Y).solution.T
    torch.testing.assert_close(fit, ls[:, :12], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fb, ls[:, 12], rtol=1e-8, atol=1e-8)
    same, _ = refit.corrected(W, G, torch.zeros_like(E), 0.05)
    torch.testing.assert_close(same, W, rtol=1e-10, atol=1e-10)
    with pytest.raises(refit.RefitError, match="error's sum"):
        refit.corrected(W, G, E, 0.0, bias=b, x_sum=X.sum(0), count=300)


def test_one_obs_step_equals_its_closed_form():
    W, X = _random_problem()
    G = X.T @ X
    H = G + 0.01 * G.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    cost = W.square().sum(0) / Hinv.diagonal()
    order, errors = refit.obs_order(W, G, 1, damp=0.01, remove=1)
    j = int(cost.argmin())
    assert order == [j] and errors[0] == pytest.approx(float(cost[j]), rel=1e-9)
    # The OBS update of the remaining weights is the ridge refit on what is left, and the error it predicts is the
    # objective's increase.
    keep = [i for i in range(12) if i != j]
    W_obs = W - W[:, [j]] @ Hinv[[j], :] / Hinv[j, j]
    refit_w, _ = refit.ridge_refit(W, G, keep, damp=0.01)
    torch.testing.assert_close(W_obs[:, keep], refit_w, rtol=1e-8, atol=1e-8)
    D = W.clone()
    D[:, keep] -= refit_w
    assert float(torch.trace(D @ H @ D.T)) == pytest.approx(errors[0], rel=1e-8)


def test_grouped_obs_removes_whole_groups_and_batches_agree_on_errors():
    W, X = _random_problem(m=12)
    G = X.T @ X
    order, errors = refit.obs_order(W, G, group=3, damp=0.01, remove=2)
    assert len(order) == 2 and len(set(order)) == 2 and all(0 <= u < 4 for u in order)
    assert errors[1] >= errors[0] > 0
    _, batched = refit.obs_order(W, G, group=1, damp=0.01, remove=6, batch=3)
    _, single = refit.obs_order(W, G, group=1, damp=0.01, remove=6, batch=1)
    assert single[-1] <= batched[-1] * (1 + 1e-9)  # here one at a time ends no worse than in batches of 3


def test_depth_replacement_is_exact_on_linear_layers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = a @ M  # the span acts linearly on what block k contributes
    A, C = a.T @ a, a.T @ b
    T = refit.replacement(A, C, damp=0.0)
    torch.testing.assert_close(T, M, rtol=1e-8, atol=1e-8)
    err = refit.replacement_error(A, C, b.square().sum(0), T)
    assert err.shape == (6,) and err.abs().max() < 1e-6
    # A replacement that is off leaves exactly |a (T - M)|^2 in each channel.
    T2 = T + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(refit.replacement_error(A, C, b.square().sum(0), T2), (a @ T2 - b).square().sum(0))
    assert refit.runs((3, 4, 7, 9, 10, 11)) == [(3, 2), (7, 1), (9, 3)]


def test_depth_replacement_finds_and_folds_an_exactly_replaceable_span():
    """Layer 2 of a 4-layer model is made to act linearly (its MLP adds 0.5 x block 1's MLP output to the
    residual stream; its attention is silent). The replacement of that span is then exact: it is chosen, its
    predicted residual is ~0, and the model with layer 2 dropped and T folded into block 1 reproduces the dense
    model's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    a1 = {}
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else None
        m.model.layers[2].self_attn.o_proj.weight.zero_()
    # Layer 2's MLP output replaced by 0.5 x layer 1's MLP output (a linear function of what block 1 supplies).
    h1 = m.model.layers[1].mlp.register_forward_hook(lambda mod, i, o: a1.update(a=o))
    h2 = m.model.layers[2].mlp.register_forward_hook(lambda mod, i, o: 0.5 * a1["a"])
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    st = S.accumulate(m, ids, 4, spec=S.StatSpec(depth_spans=(1,)))
    with torch.no_grad():
        dense_logits = m(ids[:2]).logits
    h2.remove(), h1.remove()
    first, rel = P.replacement_span(st, 1, damp=0.0)
    assert first == 2 and rel[2] < 1e-6 < min(rel[1], rel[3]) and rel[0] == float("inf")
    scores = scoring.score_all("depth", st, m)
    plan = P.plan_from_shape(scores, m, P.Shape((0, 1, 3), 16, 2), domain="d", method="depth", replace=True,
                             damp=0.0)
    w = refit.compensation(m, plan, st, damp=0.0)
    assert set(w) == {"model.layers.1.mlp.down_proj.weight"}
    small = SL.slim(m, plan, w)
    with torch.no_grad():
        torch.testing.assert_close(small(ids[:2]).logits, dense_logits, rtol=1e-4, atol=1e-4)
        plain = SL.slim(m, plan)(ids[:2]).logits
    assert (plain - dense_logits).abs().max() > 1e-2  # dropping without the replacement is not exact


@pytest.mark.parametrize("method, kv", [("wanda-sp", 0), ("contextual", 1), ("obs", 1), ("magnitude", 0)])
def test_compensated_slim_equals_compensated_mask_and_reloads(model, prof, method, kv, tmp_path):
    plan = P.build_plan(prof, model, PruneConfig(method=method, target=0.3, kv_groups=kv, multiple_of=4), domain="d")
    assert plan.reconstruct
    weights = refit.compensation(model, plan, prof)
    names = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    if kv:
        names |= {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(3)}
    assert set(weights) == names
    small = SL.slim(model, plan, weights)
    ref = SL.mask(copy.deepcopy(model), plan, weights)
    ids = _blocks(2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
    small.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits)


def test_compensation_lowers_the_layer_error_for_every_activation_aware_method(model, prof):
    """The refit minimises each pruned layer's output error on the calibration data, so it must beat keeping the
    surviving weights as they are, for any selection."""
    x = {}
    layer = model.model.layers[1]
    h = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: x.update(x=a[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        model(_blocks(6))  # the calibration tokens of `prof`
    h.remove()
    X = x["x"].double()
    W = layer.mlp.down_proj.weight.double()
    for method in ("contextual", "wanda-sp", "obs", "magnitude", "random"):
        plan = P.build_plan(prof, model, PruneConfig(method=method, target=0.3, multiple_of=4), domain="d")
        keep = list(plan.layers[1].mlp_keep)
        new = refit.compensation(model, plan, prof)["model.layers.1.mlp.down_proj.weight"].double()
        plain = (X[:, keep] @ W[:, keep].T - X @ W.T).square().sum()
        fitted = (X @ new.T - X @ W.T).square().sum()
        assert fitted < plain, method


def test_missing_gram_statistics_name_the_fix(model):
    base = S.accumulate(model, _blocks(2), batch_size=2)
    plan = P.build_plan(base, model, PruneConfig(method="wanda-sp", target=0.3, multiple_of=4), domain="d")
    with pytest.raises(refit.RefitError, match="prune.reconstruct"):
        refit.compensation(model, plan, base)
    with pytest.raises(refit.RefitError, match="Gram"):
        P.build_plan(base, model, PruneConfig(method="obs", target=0.3, multiple_of=4), domain="d")


def test_sequential_pruning_is_exact_across_runners_and_slims_to_its_masked_model(model):
    from minigpt import sequential as Q

    blocks = _blocks(8)
    cfg = PruneConfig(method="wanda-sp", target=0.3, kv_groups=1, multiple_of=4, sequential=True)
    one, w1 = Q.prune_sequential(model, [Q.LayerRunner(model, blocks, 2)], cfg, domain="d")
    two, w2 = Q.prune_sequential(model, [Q.LayerRunner(model, blocks[:4], 2), Q.LayerRunner(model, blocks[4:], 2)],
                                 cfg, domain="d")
    assert one.layers == two.layers and one.sequential and one.uniform and set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-7, atol=1e-7)
    # Layer 0's attention sees the dense model's inputs, so it is chosen and refit exactly as one-shot would; what
    # comes after sees pruned activations.
    prof = S.accumulate(model, blocks, 2, spec=GRAM)
    shot = P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.3, kv_groups=1, multiple_of=4),
                        domain="d")
    assert shot.layers[0].kv_keep == one.layers[0].kv_keep and shot.layers != one.layers
    name = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(refit.compensation(model, shot, prof)[name], w1[name], rtol=1e-5, atol=1e-6)
    ids = _blocks(2, seed=9)
    small = SL.slim(model, one, w1)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, SL.mask(copy.deepcopy(model), one, w1)(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert count_parameters(small) == (one.params["total"], one.params["non_embedding"])


def test_stream_refit_is_exact_across_runners_and_tracks_the_dense_stream_closer(model):
    """prune.refit_target stream: the sums are exact across runners, layer 0 (nothing upstream has drifted yet)
    is chosen as with the layer target, and on the calibration blocks the pruned model's last stream is closer to
    the dense one than with the layer target; the result slims to its masked model."""
    from minigpt import sequential as Q

    blocks = _blocks(8)
    cfg = {t: PruneConfig(method="obs", target=0.3, multiple_of=4, sequential=True, refit_target=t)
           for t in ("layer", "stream")}
    layer, wl = Q.prune_sequential(model, [Q.LayerRunner(model, blocks, 2)], cfg["layer"], domain="d")
    one, w1 = Q.prune_sequential(model, [Q.LayerRunner(model, blocks, 2)], cfg["stream"], domain="d")
    two, w2 = Q.prune_sequential(model, [Q.LayerRunner(model, blocks[:4], 2),
                                         Q.LayerRunner(model, blocks[4:], 2)], cfg["stream"], domain="d")
    assert one.layers == two.layers and set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-7, atol=1e-7)
    assert one.layers[0].mlp_keep == layer.layers[0].mlp_keep and one.layers != layer.layers

    def last_stream(m):
        with torch.no_grad():
            return m.model(blocks).last_hidden_state.double()

    dense = last_stream(model)
    err = {t: (last_stream(SL.slim(model, plan, w)) - dense).square().sum() for t, plan, w in
           (("layer", layer, wl), ("stream", one, w1))}
    assert err["stream"] < 0.8 * err["layer"]
    with torch.no_grad():
        torch.testing.assert_close(SL.slim(model, one, w1)(blocks).logits,
                                   SL.mask(copy.deepcopy(model), one, w1)(blocks).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="refit_target stream needs prune.sequential"):
        PruneConfig(refit_target="stream", sequential=False)


def test_stream_attention_correction_is_exact_and_tracks_the_dense_stream_closer(model):
    """prune.stream_attn: every attention output projection is also refit at full width toward the dense stream
    after the attention. Exact across runners; it changes o_proj (which plain MLP pruning leaves alone), brings the
    calibration blocks' last stream closer to the dense one than the MLP correction alone, and still slims to its
    masked model; with an infinite ridge it is the layer target again."""
    from minigpt import sequential as Q

    blocks = _blocks(8)

    def run(parts, **kw):
        cfg = PruneConfig(method="obs", target=0.3, multiple_of=4, sequential=True, **kw)
        return Q.prune_sequential(model, [Q.LayerRunner(model, b, 2) for b in parts], cfg, domain="d")

    mlp_only, wm = run([blocks], refit_target="stream", stream_attn=False)
    one, w1 = run([blocks], refit_target="stream", stream_attn=True)
    two, w2 = run([blocks[:4], blocks[4:]], refit_target="stream", stream_attn=True)
    assert one.layers == two.layers and set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-7, atol=1e-7)
    o_proj = [k for k in w1 if "o_proj" in k]
    assert len(o_proj) == len(one.layers) and not any("o_proj" in k for k in wm)
    dense_params = dict(model.named_parameters())
    # Layer 0's attention sees the dense stream (nothing upstream changed yet): e = 0 gives its weights back.
    torch.testing.assert_close(w1[o_proj[0]], dense_params[o_proj[0]].detach(), rtol=1e-6, atol=1e-6)
    assert all(not torch.allclose(w1[k], dense_params[k]) for k in o_proj[1:])

    def last_stream(m):
        with torch.no_grad():
            return m.model(blocks).last_hidden_state.double()

    dense = last_stream(model)
    err = {name: (last_stream(SL.slim(model, plan, w)) - dense).square().sum()
           for name, plan, w in (("mlp", mlp_only, wm), ("attn", one, w1))}
    assert err["attn"] < err["mlp"]
    with torch.no_grad():
        torch.testing.assert_close(SL.slim(model, one, w1)(blocks).logits,
                                   SL.mask(copy.deepcopy(model), one, w1)(blocks).logits, rtol=1e-5, atol=1e-5)
    layer, wl = run([blocks], refit_target="layer")
    huge, wh = run([blocks], refit_target="stream", stream_attn=True, stream_damp=1e12)
    assert huge.layers == layer.layers
    for k in wh:
        torch.testing.assert_close(wh[k], wl[k] if k in wl else dense_params[k].detach(), rtol=1e-6, atol=1e-6)


def test_stream_correction_ridge_spans_stream_to_layer_target(model):
    """prune.stream_damp is the ridge of the stream correction alone: as it grows, W* = W + E (G + lam I)^-1 tends
    to W and the stream target's choices and weights become the layer target's; a moderate one differs from both."""
    from minigpt import sequential as Q

    blocks = _blocks(8)

    def run(target, **kw):
        cfg = PruneConfig(method="obs", target=0.3, multiple_of=4, sequential=True, refit_target=target, **kw)
        return Q.prune_sequential(model, [Q.LayerRunner(model, blocks, 2)], cfg,
                                  domain="d")

    layer, wl = run("layer")
    huge, wh = run("stream", stream_damp=1e12)
    assert huge.layers == layer.layers
    for k in wl:
        torch.testing.assert_close(wh[k], wl[k], rtol=1e-6, atol=1e-6)
    small, ws = run("stream", stream_damp=0.01)
    mid, wm = run("stream", stream_damp=1.0)
    down = [k for k in wl if "down_proj" in k]
    assert all(not torch.allclose(wm[k], ws[k]) and not torch.allclose(wm[k], wl[k]) for k in down[1:])


def test_stream_ridge_is_a_fixed_prior_above_its_reference_tokens():
    from minigpt.sequential import STREAM_DAMP_TOKENS, stream_ridge

    assert stream_ridge(1.0, 128) == stream_ridge(1.0, STREAM_DAMP_TOKENS) == 1.0
    # Above the reference the relative ridge falls as 1/tokens, so ridge x Gram (which grows with them) stays put.
    assert stream_ridge(1.0, 16 * STREAM_DAMP_TOKENS) == 1.0 / 16 and stream_ridge(0.5, 4 * STREAM_DAMP_TOKENS) == 0.125


def test_allocation_picks_the_stock_shape_with_the_least_predicted_error(model):
    from minigpt import allocate as A

    spec = P.stat_spec(PruneConfig(target=0.3, allocate=True), model)
    assert spec.gram and spec.depth_spans == A.depth_options(P.depth_layers(model, 0.3))
    prof = S.accumulate(model, _blocks(8), batch_size=2, spec=spec)
    grad = S.taylor_sums(model, _blocks(4), batch_size=2)
    fisher = grad["taylor_resid"]
    cfg = PruneConfig(target=0.3, allocate=True, multiple_of=4)
    with pytest.raises(ConfigError, match="taylor_resid"):
        A.allocate(model, prof, cfg, None)
    best, cands = A.allocate(model, prof, cfg, fisher)
    assert best == min(cands, key=lambda c: (c.predicted, -c.mlp_width))
    assert {c.kv_groups for c in cands} == {1, 2} and {c.q_heads for c in cands} == {1, 2}
    assert all(abs(c.removed - 0.3) < 0.06 for c in cands)
    # Its MLP-only candidate's prediction is the OBS error of that cut in each output channel, priced by the squared
    # loss gradient of the stream it is added to, summed over layers: computed here from the refit itself.
    mlp_only = next(c for c in cands if c.depth == 0 and c.kv_groups == 2 and c.q_heads == 2)
    expect = 0.0
    for i, layer in enumerate(model.model.layers):
        W, G = layer.mlp.down_proj.weight.detach().double(), prof["mlp_gram"][i]
        order, _ = refit.obs_order(W * fisher[i + 1].sqrt()[:, None], G, 1, cfg.damp,
                                   remove=64 - mlp_only.mlp_width, batch=1)
        keep = sorted(set(range(64)) - set(order))
        W2 = torch.zeros_like(W)
        W2[:, keep] = refit.ridge_refit(W, G, keep, cfg.damp)[0]
        lam = refit._ridge(G, cfg.damp)
        D = W - W2  # the objective: sum_t |D x|^2 + lam |D|^2, priced per output channel
        expect += float(((D @ G * D).sum(1) + lam * D.square().sum(1)) @ fisher[i + 1])
    assert mlp_only.predicted == pytest.approx(expect, rel=1e-6)
    # Every price is positive where the loss depends on the stream.
    assert fisher.shape == (len(model.model.layers) + 1, 32) and bool((fisher > 0).all())
    plan = P.build_plan(prof, model, cfg, domain="d", grad_stats=grad)
    assert (plan.mlp_width, plan.kv_width or 2, plan.q_width or 2, len(plan.dropped_layers)) == \
        (best.mlp_width, best.kv_groups, best.q_heads, best.depth)
    small, _ = SL.slim_expert(model, None, plan, prof)
    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])


def test_verified_allocation_builds_the_shortlisted_shape_with_the_lowest_measured_loss(model):
    """prune.verify: the prediction only shortlists (the plain shape, then the best of each span length); each is built,
    compensated and slimmed, its loss measured on unseen blocks, and the lowest measured loss is built."""
    from minigpt import allocate as A

    cfg = PruneConfig(target=0.34, allocate=True, multiple_of=4, verify=3)
    prof = S.accumulate(model, _blocks(8), batch_size=2, spec=P.stat_spec(cfg, model))
    grad = S.taylor_sums(model, _blocks(4), batch_size=2)
    _, cands = A.allocate(model, prof, cfg, grad["taylor_resid"])
    ranked = sorted(cands, key=lambda c: (c.predicted, -c.mlp_width))
    depths = sorted({c.depth for c in cands}, key=lambda n: min(c.predicted for c in cands if c.depth == n))
    assert depths[:2] in ([0, 1], [1, 0])  # one layer of three is about the target: a span competes
    plain = next(c for c in cands if (c.depth, c.kv_groups, c.q_heads) == (0, 2, 2))  # what no allocation builds
    short = A.shortlist(cands, 3)
    # First what no allocation builds (measuring can only improve on it), then the cheapest predicted shape of
    # each span length, cheapest first.
    assert short[0] == plain and len(set(short)) == 3
    assert short[1] == next(c for c in ranked if c != plain)
    assert short[1].depth != short[2].depth
    for c in short[1:]:
        assert c == next(x for x in ranked if x.depth == c.depth and x != plain)
    unseen = _blocks(4, seed=7)
    lines = []
    plan = P.build_plan(prof, model, cfg, domain="d", grad_stats=grad, verify_blocks=unseen, log=lines.append)
    assert len(lines) == 3 and all("measured loss" in line for line in lines)
    measured = [float(line.rsplit(" ", 1)[1]) for line in lines]

    def loss_of(p):  # an independent measurement: the slimmed model's own loss on the blocks
        with torch.no_grad():
            return float(SL.slim_expert(model, None, p, prof)[0](unseen, labels=unseen).loss)

    assert loss_of(plan) == pytest.approx(min(measured), rel=1e-5)
    chosen = short[measured.index(min(measured))]
    assert (plan.mlp_width, len(plan.dropped_layers)) == (chosen.mlp_width, chosen.depth)
    # verify 0: the predicted cheapest, as before.
    best, _ = A.allocate(model, prof, cfg, grad["taylor_resid"])
    unverified = P.build_plan(prof, model, PruneConfig(target=0.34, allocate=True, multiple_of=4, verify=0),
                              domain="d", grad_stats=grad, verify_blocks=unseen)
    assert (unverified.mlp_width, len(unverified.dropped_layers)) == (best.mlp_width, best.depth)


def test_obs_removes_only_candidate_units():
    W, X = _random_problem(m=12)
    order, errors = refit.obs_order(W, X.T @ X, group=2, damp=0.01, remove=2, candidates=[3, 4, 5])
    assert len(order) == 2 and set(order) <= {3, 4, 5} and errors[1] >= errors[0]


def test_residual_gradient_sums_equal_autograd(model):
    """taylor_resid row i = sum over tokens of (dL/dh_i)^2 for the stream h_i entering layer i, batch by batch."""
    ids = _blocks(4, seed=5)
    got = S.taylor_sums(model, ids, batch_size=2)["taylor_resid"]
    expect = torch.zeros_like(got[:-1])
    for start in (0, 2):
        out = model(input_ids=ids[start:start + 2], labels=ids[start:start + 2], output_hidden_states=True)
        hs = out.hidden_states[: len(model.model.layers)]  # the last entry is after the final norm
        for h in hs:
            h.retain_grad()
        out.loss.backward()
        expect += torch.stack([h.grad.reshape(-1, h.shape[-1]).double().square().sum(0) for h in hs])
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[:-1], expect, rtol=1e-5, atol=1e-12)
    assert bool((got[-1] > 0).all())


def test_allocation_front_is_the_cheapest_width_shape_per_target(model, prof):
    """The search's warm start: one priced curve set, then per target the cheapest shape without replaced spans
    or query-head cuts; a target the MLPs cannot reach gives nothing rather than an error."""
    from minigpt import allocate as A

    fisher = S.taylor_sums(model, _blocks(4), batch_size=2)["taylor_resid"]
    front = A.allocation_front(model, prof, fisher, (0.1, 0.3, 0.99), damp=0.01, multiple_of=4)
    assert len(front) == 2 and [round(c.removed, 1) for c in front] == [0.1, 0.3]
    assert all(c.depth == 0 and c.q_heads == 2 for c in front)
    for c, t in zip(front, (0.1, 0.3)):
        _, cands = A.allocate(model, prof, PruneConfig(target=t, allocate=True, multiple_of=4), fisher)
        best = min((x for x in cands if x.depth == 0 and x.q_heads == 2), key=lambda x: (x.predicted, -x.mlp_width))
        assert (c.mlp_width, c.kv_groups) == (best.mlp_width, best.kv_groups)
        assert c.predicted == pytest.approx(best.predicted, rel=1e-9)
