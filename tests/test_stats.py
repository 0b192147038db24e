"""Statistics are sums: merging is exact, order-free, and equals one pass over the same batches."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import stats as S
from tests.conftest import make_tiny_llama


def _blocks(n, t=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _direct_statistics(model, blocks, depth_span: int) -> dict[str, torch.Tensor]:
    """Every statistic computed directly, in float64 over all tokens at once, from activations captured on one
    forward pass: what S.accumulate must equal (it sums per batch, products in the activations' fp32)."""
    layers = model.model.layers
    L, V = len(layers), model.config.vocab_size
    H = model.config.num_attention_heads
    down_in, o_in, h_in, h_out, mlp_out = {}, {}, {}, {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks += [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: down_in.__setitem__(i, a[0])),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_in.__setitem__(i, a[0])),
            layer.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_out.__setitem__(i, out)),
            layer.register_forward_pre_hook(lambda m, a, kw, i=i: h_in.__setitem__(i, a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True),
            layer.register_forward_hook(lambda m, a, out, i=i: h_out.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                 else out)),
        ]
    with torch.no_grad():
        model(input_ids=blocks)
    for h in hooks:
        h.remove()

    def flat(t):
        return t.detach().double().reshape(-1, t.shape[-1])

    x = {i: flat(down_in[i]) for i in range(L)}
    o = {i: flat(o_in[i]) for i in range(L)}
    hs = [flat(h_in[i]) for i in range(L)] + [flat(h_out[L - 1])]  # hs[j]: the residual stream entering layer j
    a = {i: flat(mlp_out[i]) for i in range(L)}
    out = {"tokens": torch.tensor([float(blocks.numel())], dtype=torch.float64),
           "token_counts": torch.bincount(blocks.flatten(), minlength=V).double(),
           "mlp_abs_sum": torch.stack([x[i].abs().sum(0) for i in range(L)]),
           "mlp_sq_sum": torch.stack([x[i].square().sum(0) for i in range(L)]),
           "head_sq_sum": torch.stack([o[i].reshape(len(o[i]), H, -1).square().sum((0, 2)) for i in range(L)]),
           "hidden_sq_sum": torch.stack([hs[i].square().sum(0) for i in range(L)]),
           "block_cos_sum": torch.stack([torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).sum()
                                         for i in range(L)]),
           "mlp_gram": torch.stack([x[i].T @ x[i] for i in range(L)]),
           "mlp_sum": torch.stack([x[i].sum(0) for i in range(L)]),
           "attn_gram": torch.stack([o[i].T @ o[i] for i in range(L)]),
           "attn_sum": torch.stack([o[i].sum(0) for i in range(L)]),
           "mlp_out_gram": torch.stack([a[i].T @ a[i] for i in range(L)])}
    n = depth_span
    cross, bsq = torch.zeros(L, hs[0].shape[1], hs[0].shape[1], dtype=torch.float64), torch.zeros(L, hs[0].shape[1],
                                                                                               dtype=torch.float64)
    for k in range(L):
        if k + 1 + n <= L:  # cutting layers k+1..k+n: block k's MLP output must also supply what they added
            b = hs[k + 1 + n] - hs[k + 1] + a[k]
            cross[k], bsq[k] = a[k].T @ b, b.square().sum(0)
    out[f"depth_cross_{n}"], out[f"depth_bsq_{n}"] = cross, bsq
    return out


def test_hooks_record_every_statistic():
    model = make_tiny_llama()
    blocks = _blocks(4)
    st_ = S.accumulate(model, blocks, batch_size=2, spec=S.StatSpec(gram=True, depth_spans=(1,)))
    direct = _direct_statistics(model, blocks, depth_span=1)
    assert set(st_) == set(direct)  # a statistic added without a direct check fails here
    assert all(v.dtype == torch.float64 for v in st_.values())
    for k in direct:
        # Per-batch sums of fp32 activation products against one fp64 sum: equal to fp32 rounding.
        torch.testing.assert_close(st_[k], direct[k], rtol=1e-5, atol=1e-5 * float(direct[k].abs().max()),
                                   msg=lambda m, k=k: f"{k}: {m}")
    assert st_["tokens"].item() == 64 and st_["token_counts"].sum().item() == 64


def test_mlp_abs_sum_matches_direct_computation():
    model = make_tiny_llama()
    blocks = _blocks(2)
    captured = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    st_ = S.accumulate(model, blocks, batch_size=2)
    h.remove()
    direct = captured[0].double().abs().reshape(-1, 64).sum(0)
    torch.testing.assert_close(st_["mlp_abs_sum"][1], direct, rtol=1e-6, atol=1e-8)


def test_split_passes_merge_to_single_pass():
    model = make_tiny_llama()
    blocks = _blocks(8)
    whole = S.accumulate(model, blocks, batch_size=2)
    parts = [S.accumulate(model, blocks[i:i + 2], batch_size=2) for i in range(0, 8, 2)]
    merged = S.merge(reversed(parts))
    for k in whole:
        torch.testing.assert_close(merged[k], whole[k], rtol=1e-9, atol=0)


def test_numpy_round_trip_is_exact():
    st_ = S.accumulate(make_tiny_llama(), _blocks(2), batch_size=2)
    back = S.from_numpy(S.to_numpy(st_))
    assert all(torch.equal(back[k], st_[k]) for k in st_)


_arrays = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(_arrays, min_size=1, max_size=6), st.randoms())
def test_merge_is_order_free_and_additive(values, rnd):
    parts = [{"x": torch.tensor(v, dtype=torch.float64), "tokens": torch.tensor([1.0])} for v in values]
    shuffled = parts[:]
    rnd.shuffle(shuffled)
    a, b = S.merge(parts), S.merge(shuffled)
    torch.testing.assert_close(a["x"], b["x"], rtol=1e-9, atol=1e-6)
    assert a["tokens"].item() == len(values)
    # Merging in two groups equals merging all at once (associativity).
    k = len(parts) // 2
    if 0 < k < len(parts):
        g = S.merge([S.merge(parts[:k]), S.merge(parts[k:])])
        torch.testing.assert_close(g["x"], a["x"], rtol=1e-9, atol=1e-6)


def test_merge_rejects_mismatched_entries():
    import pytest

    with pytest.raises(ValueError):
        S.merge([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
