"""Plans and slimming: physical removal equals masking, counts match predictions, JSON round-trips."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from minigpt import scoring, slim, stats as S
from minigpt.config import ConfigError
from minigpt.models import count_parameters
from minigpt.plan import LayerPlan, PruningPlan, build_uniform, uniform_mlp_width
from tests.conftest import make_tiny_llama


def _profile(model):
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return S.accumulate(model, blocks, batch_size=2)


@pytest.mark.parametrize("method", sorted(scoring.METHODS))
def test_slimmed_logits_equal_masked_dense(method):
    model = make_tiny_llama()
    scores = scoring.score(method, _profile(model), model, seed=3)
    plan = build_uniform(scores, model, domain="d", method=method, target=0.3, multiple_of=8)
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
    plan = build_uniform(scoring.contextual(_profile(model), model), model, domain="d", method="contextual",
                         target=0.25, multiple_of=8)
    removed = 1 - plan.params["non_embedding"] / plan.params["dense_non_embedding"]
    assert abs(removed - 0.25) < 0.03
    assert plan.mlp_width % 8 == 0


def test_contextual_keeps_highest_mean_activation():
    model = make_tiny_llama()
    prof = _profile(model)
    plan = build_uniform(scoring.contextual(prof, model), model, domain="d", method="contextual", target=0.3)
    mean = prof["mlp_abs_sum"][0] / prof["tokens"]
    kept = set(plan.layers[0].mlp_keep)
    dropped = [j for j in range(64) if j not in kept]
    assert min(mean[list(kept)]) >= max(mean[dropped])


def test_save_reload_with_plain_transformers(tmp_path):
    from minigpt.models import load_tokenizer

    model = make_tiny_llama()
    plan = build_uniform(scoring.random(_profile(model), model), model, domain="d", method="random", target=0.3)
    small = slim.slim(model, plan)
    tok_dir = tmp_path / "tok"
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
    assert load_tokenizer(out) is not None and not tok_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be reached"):
        uniform_mlp_width(make_tiny_llama(), 0.99, 8)


def test_plan_rejects_wrong_model():
    model = make_tiny_llama()
    plan = build_uniform(torch.rand(3, 64, dtype=torch.float64), model, domain="d", method="random", target=0.3)
    with pytest.raises(ValueError):
        slim.slim(make_tiny_llama(layers=2), plan)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=20, unique=True), min_size=1, max_size=5),
       st.floats(0.01, 0.99), st.text(min_size=1, max_size=10))
def test_plan_json_round_trip(keeps, target, domain):
    plan = PruningPlan(domain=domain, method="contextual", target=target, model_type="llama", num_layers=len(keeps),
                       intermediate_size=1001, layers=tuple(LayerPlan(i, tuple(sorted(k))) for i, k in enumerate(keeps)),
                       params={"total": 5})
    assert PruningPlan.from_json(plan.to_json()) == plan
