"""The one slow test on the real SmolLM2-135M: profile, plan at 25%, slim, save, reload with plain transformers."""

import pytest
import torch

from minigpt import models, scoring, slim, stats as S
from minigpt.config import ModelConfig
from minigpt.plan import build_uniform

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_dir():
    try:
        return models.resolve(ModelConfig(source="smollm2-135m"))
    except Exception as e:  # the Makefile prepares it; a bare checkout without the package skips
        pytest.skip(f"smollm2-135m not available: {e}")


def test_real_model_slims_to_a_stock_checkpoint(real_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    dense = models.load_model(real_dir)
    tok = models.load_tokenizer(real_dir)
    text = open(__file__).read() * 4
    ids = torch.tensor(tok(text)["input_ids"][: 4 * 128]).reshape(4, 128)
    prof = S.accumulate(dense, ids, batch_size=2)
    plan = build_uniform(scoring.contextual(prof, dense).mlp, dense, domain="code", method="contextual", target=0.25,
                         multiple_of=8)
    small = slim.slim(dense, plan)
    out = slim.save_expert(small, tok, tmp_path / "expert")

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    _, dense_ne = models.count_parameters(dense)
    total, non_emb = models.count_parameters(reloaded)
    assert abs((1 - non_emb / dense_ne) - 0.25) < 0.01  # counted, not assumed
    assert reloaded.config.intermediate_size == plan.mlp_width == 1024
    with torch.no_grad():
        probe = ids[:1, :64]
        got = reloaded(probe).logits
        ref = slim.mask(dense, plan)(probe).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # The real profile is informative: kept channels have higher mean |a| than removed ones in every layer.
    mean = prof["mlp_abs_sum"] / prof["tokens"]
    for lp in plan.layers:
        keep = torch.zeros(1536, dtype=torch.bool)
        keep[list(lp.mlp_keep)] = True
        assert mean[lp.index][keep].min() >= mean[lp.index][~keep].max()
