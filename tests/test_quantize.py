"""int8 weight quantization (torchao) of a tiny expert: saved, reloaded with plain from_pretrained, close to float."""

import pytest
import torch

pytest.importorskip("torchao")

from minigpt import quantize as Q  # noqa: E402
from minigpt.config import ConfigError  # noqa: E402
from minigpt.optconfig import QuantizeConfig  # noqa: E402


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    from conftest import TEXT, make_tiny_pair

    folder = tmp_path_factory.mktemp("expert")
    model, tok = make_tiny_pair(hidden=64, inter=128, layers=2)
    # Realistic weight scale: the fixture's N(0, 0.2) weights make logits so large that int8 rounding dominates.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.25)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, TEXT


def test_quantized_expert_reloads_smaller_and_close(expert, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model, text = expert
    out = Q.quantize_expert(folder, tmp_path / "int8")
    assert not list(tmp_path.glob(".int8-*"))  # atomic: no temporary folder left behind
    # Plain from_pretrained reloads it: config.json names the torchao quantization.
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert Q.is_quantized(loaded) and not Q.is_quantized(model)
    assert type(loaded.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # Linear weights shrink 4x; the float embedding stays, so the file shrinks but by less than 4x.
    assert Q.weight_bytes(out) < 0.75 * Q.weight_bytes(folder)

    r = Q.compare(folder, out, [text * 4], block_size=32, batch_size=2, max_blocks=2, speed=(1, 16, 1))
    assert r["int8"]["quantized"] and not r["float"]["quantized"]
    assert r["ratios"]["size"] < 0.75 and abs(r["ratios"]["ppl"] - 1) < 0.05


def test_quantize_config_rejects_unknown_scheme():
    with pytest.raises(ConfigError, match="quantize.scheme"):
        QuantizeConfig(scheme="int4")
