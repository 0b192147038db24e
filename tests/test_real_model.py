"""The slow tests on the real SmolLM2-135M: profile with Gram statistics, a compensated plan at 25%, slim, save,
reload with plain transformers, and the compensation beats plain slicing on held-back text; and the memory a
streamed calibration worker is predicted to need against what it measurably takes."""

import copy
from pathlib import Path

import pytest
import torch

from minigpt import models, plan as P, refit, slim, stats as S
from minigpt.config import PruneConfig
from minigpt.memory import BASE_BYTES, model_sizes, predict_memory
from minigpt.memprobe import streamed_calibration_fresh

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


def test_predicted_streamed_peak_is_within_25_percent_of_the_measured_peak(smollm2_dir):
    """A calibration worker's streamed pass (accumulate_streamed over a LayerStore of the real checkpoint: two
    batches of 4 x 256 tokens, every token's hidden state held) runs in a fresh process, so the peak RSS is that
    process's own and not this test runner's, which may hold whole models already. The peak minigpt.memory predicts
    from the config alone (BASE_BYTES for the interpreter and libraries included) is within 25% of it: measured
    616 MiB against 620 predicted on the 2-core CPU machine (benchmarks/scale.py measures the same way). Of the
    620: base 300, one batch's activations 194, embedding 108, one layer 14, hidden states 4.5. A prediction that
    left out the base or the activations, or counted every layer as a whole-model process holds them (1012 MiB),
    would be off by more than 25%."""
    from transformers import AutoConfig

    tokens, seq, batch = 2048, 256, 4
    got = streamed_calibration_fresh(str(smollm2_dir), tokens, seq, batch, threads=1, timeout=600)
    predicted = predict_memory(model_sizes(AutoConfig.from_pretrained(smollm2_dir)), "float32", batch, seq, tokens,
                               None, BASE_BYTES).streamed_peak / 2**20
    assert got["predicted_mib"] == pytest.approx(predicted)  # the child ran the settings predicted here
    assert abs(predicted - got["peak_rss_mib"]) <= 0.25 * got["peak_rss_mib"], (predicted, got)


def test_predicted_runner_peak_is_within_25_percent_of_the_measured_peak(smollm2_dir):
    """A sequential runner (its share of 4,096 domain tokens and 2,048 general ones, one layer of the stream-target
    protocol: dense stream, attention and MLP statistics with their drift and Gram matrices, new weights applied,
    advance) in a fresh process: its peak is within 25% of `predict_memory(...).runner_peak`. Measured on the 2-core
    machine: 865 MiB against 764 predicted over three layers with 8,192 + 4,096 tokens; 2,400 against 2,289 on
    Qwen2.5-Coder-0.5B (2,048 + 1,024 tokens, two layers), where the Gram matrices are 0.21 GiB a layer."""
    got = streamed_calibration_fresh(str(smollm2_dir), 4096, 256, 4, threads=1, timeout=600, runner_layers=1,
                                     general_tokens=2048)
    assert abs(got["predicted_mib"] - got["peak_rss_mib"]) <= 0.25 * got["peak_rss_mib"], got
