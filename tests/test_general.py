"""General text beside the domains (minigpt.general, stats.mix, weighted LayerRunner groups)."""

import json

import pytest
import torch

from minigpt import general as G, plan as P, refit, stats as S
from minigpt.config import DataConfig, PruneConfig, SourceConfig
from minigpt.corpora import doc_hash, read_blocks
from tests.conftest import make_tiny_llama, make_tiny_pair

GRAM = S.StatSpec(gram=True)


def _blocks(n, seed, t=16):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def test_mix_gives_the_weighted_mean_and_keeps_the_domain_vocabulary(model):
    dom, gen = S.accumulate(model, _blocks(6, 0), 2, spec=GRAM), S.accumulate(model, _blocks(4, 1), 2, spec=GRAM)
    w = 0.25
    mixed = S.mix(dom, gen, w)
    nd, ng = float(dom["tokens"]), float(gen["tokens"])
    for k in ("mlp_gram", "mlp_abs_sum", "attn_sum", "head_sq_sum"):
        want = (dom[k] / nd + w * gen[k] / ng) / (1 + w)
        torch.testing.assert_close(mixed[k] / float(mixed["tokens"]), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(mixed["token_counts"], dom["token_counts"])
    assert all(torch.equal(S.mix(dom, gen, 0.0)[k], dom[k]) for k in dom)
    with pytest.raises(ValueError, match=">= 0"):
        S.mix(dom, gen, -1.0)


def test_runner_groups_weight_general_text_exactly_like_mix(model):
    """A runner's sums are its domain blocks' plus general_weight x its general blocks', and layer 0 (dense inputs)
    is chosen and refit by sequential pruning exactly as one-shot pruning does on the mixed profile."""
    from minigpt import sequential as Q

    dom, gen = _blocks(6, 0), _blocks(4, 1)
    c = 0.5
    both = Q.LayerRunner(model, dom, 2, gen, c).stats(0)
    alone, other = Q.LayerRunner(model, dom, 2).stats(0), Q.LayerRunner(model, gen, 2).stats(0)
    for k in both:
        torch.testing.assert_close(torch.as_tensor(both[k]), torch.as_tensor(alone[k] + c * other[k]),
                                   rtol=1e-9, atol=1e-9)
    w = c * gen.numel() / dom.numel()  # the same mix, as prune.general_weight (a share of the domain's mass)
    cfg = PruneConfig(method="wanda-sp", target=0.3, kv_groups=1, multiple_of=4, sequential=True, general_weight=w)
    seq, weights = Q.prune_sequential(model, [Q.LayerRunner(model, dom, 2, gen, c)], cfg, domain="d")
    prof = S.mix(S.accumulate(model, dom, 2, spec=GRAM), S.accumulate(model, gen, 2, spec=GRAM), w)
    shot = P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.3, kv_groups=1, multiple_of=4),
                        domain="d")
    assert shot.layers[0].kv_keep == seq.layers[0].kv_keep
    name = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(refit.compensation(model, shot, prof)[name], weights[name], rtol=1e-5, atol=1e-6)
    # Without general text the choice differs somewhere: the mix is not a no-op.
    plain, _ = Q.prune_sequential(model, [Q.LayerRunner(model, dom, 2)], cfg, domain="d")
    assert plain.layers != seq.layers


def test_sampled_blocks_open_with_a_document_start_and_repeat_with_the_seed():
    model, tok = make_tiny_pair()
    a = G.sample_blocks(model, tok, 5, 12, seed=3, batch=2)
    assert a.shape == (5, 12) and (a[:, 0] == tok.eos_token_id).all()
    assert torch.equal(a, G.sample_blocks(model, tok, 5, 12, seed=3, batch=2))
    assert not torch.equal(a, G.sample_blocks(model, tok, 5, 12, seed=4, batch=2))


@pytest.mark.parametrize("make", ["llama", "gemma3"])
def test_streamed_sampling_draws_the_blocks_generate_draws(tmp_path, make):
    """The general text of a model too big for one process: sampled with one layer resident and a KV cache that
    each layer extends as it runs, it is token for token what `generate` samples from the loaded model (the same
    seed, the same draws), on Llama and on Gemma 3's sliding-window layers."""
    from minigpt.evalpass import open_forward
    from minigpt.streamed import resident_parameters

    model, tok = make_tiny_pair()
    if make == "gemma3":
        from test_export import _tiny_gemma3

        model = _tiny_gemma3(vocab=len(tok))
    model.save_pretrained(tmp_path / "m")
    streamed = open_forward(tmp_path / "m", streamed=True)
    a = G.sample_blocks(model, tok, 5, 20, seed=3, batch=2)
    b = G.sample_blocks(streamed, tok, 5, 20, seed=3, batch=2)
    assert torch.equal(a, b)
    assert resident_parameters(streamed.model) < sum(p.numel() for p in model.parameters())


def test_prepare_general_from_sources_leaves_out_evaluation_documents(tmp_path):
    model, tok = make_tiny_pair()
    docs = [f"general text number {i}: the quick brown fox jumps over the lazy dog. " * 4 for i in range(12)]
    for i, d in enumerate(docs):
        (tmp_path / f"g{i}.txt").write_text(d)
    data = DataConfig(block_size=16, blocks_per_shard=2)
    banned = {doc_hash(docs[0], data.salt)}
    n = G.prepare_general(tmp_path / "out", data, 4000, (SourceConfig(kind="text", path=str(tmp_path)),), tok,
                          open_model=lambda: pytest.fail("sources given: nothing is sampled"), banned=banned)
    blocks = read_blocks(G.shards(tmp_path / "out"))
    assert n == len(blocks) and 10 <= n < 4000 // 16 and blocks.shape[1] == 16  # all the text there is
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["source"].startswith("11 documents")  # 12 less the banned one
    # No sources: the model samples the blocks itself.
    n = G.prepare_general(tmp_path / "sampled", data, 40, (), tok, open_model=lambda: model)
    assert n == 3 and len(read_blocks(G.shards(tmp_path / "sampled"))) == 3
