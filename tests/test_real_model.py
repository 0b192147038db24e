"""The one slow test on the real SmolLM2-135M: profile with Gram statistics, a compensated plan at 25%, slim,
save, reload with plain transformers, and the compensation beats plain slicing on held-back text."""

import copy
from pathlib import Path

import pytest
import torch

from minigpt import models, plan as P, refit, slim, stats as S
from minigpt.config import PruneConfig

pytestmark = pytest.mark.slow


def test_real_model_slims_to_a_stock_checkpoint(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    dense = models.load_model(smollm2_dir)
    tok = models.load_tokenizer(smollm2_dir)
    import minigpt

    text = "".join(open(f).read() for f in sorted(Path(minigpt.__file__).parent.glob("*.py")))
    ids = torch.tensor(tok(text)["input_ids"][: 34 * 128]).reshape(34, 128)
    # The code of minigpt; the last two blocks are never calibrated on. A least-squares refit of 1536 inputs needs
    # a few thousand calibration tokens not to fit the calibration text itself.
    calib, heldout = ids[:32], ids[32:]
    prof = S.accumulate(dense, calib, batch_size=2, spec=S.StatSpec(gram=True))
    plan = P.build_plan(prof, dense, PruneConfig(method="contextual", target=0.25), domain="code")
    assert plan.reconstruct
    small, tok2 = slim.slim_expert(dense, tok, plan, prof)
    out = slim.save_expert(small, tok2, tmp_path / "expert")

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    _, dense_ne = models.count_parameters(dense)
    total, non_emb = models.count_parameters(reloaded)
    assert abs((1 - non_emb / dense_ne) - 0.25) < 0.01  # counted, not assumed
    assert reloaded.config.intermediate_size == plan.mlp_width == 1024
    with torch.no_grad():
        probe = heldout[:1, :64]
        got = reloaded(probe).logits
        ref = slim.mask(copy.deepcopy(dense), plan, refit.compensation(dense, plan, prof))(probe).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        # On text it was not fitted on, the compensated expert predicts better than the same cut without it.
        loss_refit = reloaded(heldout, labels=heldout).loss
        loss_plain = slim.slim(dense, plan)(heldout, labels=heldout).loss
    assert loss_refit < loss_plain
    # The real profile is informative: kept channels have higher mean |a| than removed ones in every layer.
    mean = prof["mlp_abs_sum"] / prof["tokens"]
    for lp in plan.layers:
        keep = torch.zeros(1536, dtype=torch.bool)
        keep[list(lp.mlp_keep)] = True
        assert mean[lp.index][keep].min() >= mean[lp.index][~keep].max()
