"""Statistics are sums: merging is exact, order-free, and equals one pass over the same batches."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import stats as S
from tests.conftest import make_tiny_llama


def _blocks(n, t=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_hooks_record_every_statistic():
    model = make_tiny_llama()
    st_ = S.accumulate(model, _blocks(4), batch_size=2)
    assert st_["tokens"].item() == 64
    assert st_["token_counts"].sum().item() == 64
    assert st_["mlp_abs_sum"].shape == (3, 64) and (st_["mlp_abs_sum"] > 0).all()
    assert torch.all(st_["mlp_sq_sum"] > 0) and st_["head_sq_sum"].shape == (3, 4)
    assert st_["hidden_sq_sum"].shape == (3, 32)
    mean_cos = st_["block_cos_sum"] / st_["tokens"]
    assert ((mean_cos > -1) & (mean_cos < 1)).all()
    assert all(v.dtype == torch.float64 for v in st_.values())


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
