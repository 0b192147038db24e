"""Plans and slimming: physical removal equals masking, counts match predictions, JSON round-trips."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from minigpt import plan as P, slim, stats as S
from minigpt.config import ConfigError, PruneConfig
from minigpt.models import count_parameters
from minigpt.plan import LayerPlan, PruningPlan, uniform_mlp_width
from tests.conftest import make_tiny_llama


def _profile(model):
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return S.accumulate(model, blocks, batch_size=2)


def _plan(model, method, target=0.3, prof=None, **kw):
    cfg = PruneConfig(method=method, target=target, reconstruct=False, **kw)
    return P.build_plan(_profile(model) if prof is None else prof, model, cfg, domain="d")


@pytest.mark.parametrize("method", ["contextual", "wanda-sp", "magnitude", "random"])
def test_slimmed_logits_equal_masked_dense(method):
    model = make_tiny_llama()
    plan = _plan(model, method, seed=3)
    small = slim.slim(model, plan)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = small(ids).logits
        ref = slim.mask(make_tiny_llama(), plan)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    total, non_emb = count_parameters(small)
    assert (total, non_emb) == (plan.params["total"], plan.params["non_embedding"])
    assert small.config.intermediate_size == plan.mlp_width < model.config.intermediate_size
    assert small.model.layers[0].mlp.gate_proj.weight.shape == (plan.mlp_width, 32)


def test_slim_reaches_target_fraction():
    model = make_tiny_llama(inter=256, hidden=32)
    plan = _plan(model, "contextual", target=0.25)
    removed = 1 - plan.params["non_embedding"] / plan.params["dense_non_embedding"]
    assert abs(removed - 0.25) < 0.03
    assert plan.mlp_width % 8 == 0


def test_contextual_keeps_highest_mean_activation():
    model = make_tiny_llama()
    prof = _profile(model)
    plan = _plan(model, "contextual", prof=prof)
    mean = prof["mlp_abs_sum"][0] / prof["tokens"]
    kept = set(plan.layers[0].mlp_keep)
    dropped = [j for j in range(64) if j not in kept]
    assert min(mean[list(kept)]) >= max(mean[dropped])


def test_save_reload_with_plain_transformers(tmp_path):
    from minigpt.models import load_tokenizer

    model = make_tiny_llama()
    plan = _plan(model, "random")
    small = slim.slim(model, plan)
    # A tiny tokenizer is enough to check the folder layout; the real one is exercised in the slow test.
    from tokenizers import Tokenizer, models as tm
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    out = slim.save_expert(small, tok, tmp_path / "expert")
    back = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == plan.mlp_width
    assert load_tokenizer(out)("a")["input_ids"] == [1]  # the saved tokenizer is the one given
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be reached"):
        uniform_mlp_width(make_tiny_llama(), 0.99, 8)


def test_plan_rejects_wrong_model():
    model = make_tiny_llama()
    plan = _plan(model, "random")
    with pytest.raises(ValueError, match="plan is for 3 layers x 64 channels, model has 2 x 64"):
        slim.slim(make_tiny_llama(layers=2), plan)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=20, unique=True), min_size=1, max_size=5),
       st.floats(0.01, 0.99), st.text(min_size=1, max_size=10))
def test_plan_json_round_trip(keeps, target, domain):
    plan = PruningPlan(domain=domain, method="contextual", target=target, model_type="llama", num_layers=len(keeps),
                       intermediate_size=1001,
                       layers=tuple(LayerPlan(i, tuple(sorted(k))) for i, k in enumerate(keeps)),
                       params={"total": 5})
    assert PruningPlan.from_json(plan.to_json()) == plan


def test_plan_json_round_trip_with_groups_layers_and_vocab():
    plan = PruningPlan(domain="d", method="depth", target=0.2, model_type="llama", num_layers=3, intermediate_size=64,
                       layers=(LayerPlan(0, (1, 2), (0,)), LayerPlan(2, (3, 4), (1,))), kv_groups=2,
                       dropped_layers=(1,), vocab_size=10, vocab_keep=(0, 3, 7), mode="threshold", threshold=0.5)
    back = PruningPlan.from_json(plan.to_json())
    assert back == plan and back.kv_width == 1 and back.mlp_width == 2


# ------------------------------------------------------------------------------------------ vocabulary

DOMAIN_TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software."


@pytest.fixture(scope="module")
def real_tokenizer(smollm2_dir):
    from minigpt.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _vocab_plan(model, tok, prune_cfg=None):
    from minigpt.config import PruneConfig
    from minigpt.plan import build_plan

    ids = torch.tensor([tok.encode(DOMAIN_TEXT) * 2])
    prof = S.accumulate(model, ids, batch_size=1)
    cfg = prune_cfg or PruneConfig(method="contextual", target=0.2, vocab=True, reconstruct=False)
    return build_plan(prof, model, cfg, domain="d", tokenizer=tok), ids


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_pruning_keeps_kept_text_exact(real_tokenizer, tie, tmp_path):
    from transformers import AutoTokenizer

    tok = real_tokenizer
    model = make_tiny_llama(vocab=len(tok), hidden=16, inter=32, layers=1, heads=2, kv_heads=1, tie=tie)
    plan, ids = _vocab_plan(model, tok)
    keep = torch.tensor(plan.vocab_keep)
    assert 256 + 17 <= len(keep) < 2000 and set(ids[0].tolist()) <= set(plan.vocab_keep)
    small, new_tok = slim.slim_expert(model, tok, plan)
    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
    assert small.config.vocab_size == len(new_tok) == len(keep)
    remap = {old: new for new, old in enumerate(plan.vocab_keep)}
    new_ids = new_tok.encode(DOMAIN_TEXT)
    assert new_ids == [remap[i] for i in tok.encode(DOMAIN_TEXT)]  # same tokens, renumbered
    x = torch.tensor([new_ids])
    with torch.no_grad():
        got = small(x).logits
        ref = slim.mask(make_tiny_llama(vocab=len(tok), hidden=16, inter=32, layers=1, heads=2, kv_heads=1, tie=tie),
                        plan)(torch.tensor([tok.encode(DOMAIN_TEXT)])).logits
    # Kept text: the pruned logits are the dense logits of the kept ids, so the loss equals the dense model's
    # loss with removed tokens excluded from the softmax (and never exceeds the dense loss).
    torch.testing.assert_close(got, ref[..., keep], rtol=1e-5, atol=1e-5)
    tgt = x[0, 1:]
    pruned_loss = torch.nn.functional.cross_entropy(got[0, :-1], tgt)
    masked = torch.full_like(ref, float("-inf"))
    masked[..., keep] = ref[..., keep]
    old_tgt = torch.tensor(tok.encode(DOMAIN_TEXT))[1:]
    torch.testing.assert_close(pruned_loss, torch.nn.functional.cross_entropy(masked[0, :-1], old_tgt))
    assert pruned_loss <= torch.nn.functional.cross_entropy(ref[0, :-1], old_tgt) + 1e-6
    # Any text still round-trips through the new tokenizer.
    for text in ["Zwölf Boxkämpfer jagen Viktor — 東京 🙂", "def f(x):\n\treturn x ** 2  # ok", DOMAIN_TEXT]:
        enc = new_tok.encode(text)
        assert max(enc) < len(keep) and new_tok.decode(enc) == text
    out = slim.save_expert(small, new_tok, tmp_path / "expert")
    back_tok = AutoTokenizer.from_pretrained(out)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back_tok.encode(DOMAIN_TEXT) == new_ids and back_tok.eos_token == tok.eos_token
    assert back.config.eos_token_id == new_tok.eos_token_id == remap[tok.eos_token_id]
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, got)


def test_vocab_keep_must_be_closed(real_tokenizer):
    from minigpt import vocab as V

    with pytest.raises(ValueError, match="not closed"):
        V.prune_tokenizer(real_tokenizer, [0, 1, 2])


def test_vocab_pruning_refuses_other_tokenizers():
    from tokenizers import Tokenizer, models as tm
    from transformers import PreTrainedTokenizerFast

    from minigpt import vocab as V

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="supported: byte-level BPE"):
        V.closure(tok, [1])
