"""Streamed slimming (minigpt.slimstream): a checkpoint slimmed one layer at a time into sharded safetensors holds
exactly what slim.slim_expert + slim.save_expert write, and loads with plain from_pretrained to the same logits."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minigpt import plan as P, refit, slim as SL, stats as S
from minigpt.config import PruneConfig
from minigpt.layerstore import INDEX, SINGLE, LayerStore, checkpoint_files
from minigpt.slimstream import slim_to_folder
from tests.conftest import make_tiny_pair

CASES = {  # name: (prune settings, max shard bytes, tied embeddings); refit weights wherever plan.reconstruct
    "plain": (dict(method="wanda-sp", target=0.3, reconstruct=False), None, True),
    "vocab-refit-shards": (dict(method="obs", target=0.4, kv_groups=1, vocab=True, reconstruct=True), 3000, False),
    "vocab-tied-shards": (dict(method="contextual", target=0.3, vocab=True, reconstruct=False), 4000, True),
    "refit-single": (dict(method="obs", target=0.3, kv_groups=1, reconstruct=True), None, False),
    "depth": (dict(method="depth", target=0.3, reconstruct=False), 3000, False),
}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(folder):
        out.update(load_file(str(folder / f)))
    return out


def _json(path) -> dict:
    d = json.loads(path.read_text())
    d.pop("transformers_version", None)
    return d


@pytest.mark.parametrize("case", CASES)
def test_streamed_slimming_writes_what_slim_and_save_pretrained_write(tmp_path, case):
    settings, shard, tie = CASES[case]
    model, tok = make_tiny_pair(tie=tie)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    blocks = torch.randint(0, len(tok), (6, 16), generator=torch.Generator().manual_seed(3))
    prof = S.accumulate(model, blocks, 2, spec=S.StatSpec(gram=True))
    plan = P.build_plan(prof, model, PruneConfig(multiple_of=4, **settings), domain="d", tokenizer=tok)
    assert bool(plan.dropped_layers) == (case == "depth") and (plan.vocab_keep is not None) == ("vocab" in case)
    weights = refit.compensation(model, plan, prof) if plan.reconstruct else None
    small, small_tok = SL.slim_expert(model, tok, plan, None, weights)
    expected = SL.save_expert(small, small_tok, tmp_path / "expected")

    out = slim_to_folder(LayerStore(dense), plan, tmp_path / "streamed", weights, tok,
                         max_shard_bytes=shard or 10**9)
    assert (out / (INDEX if shard else SINGLE)).is_file()
    if shard:
        assert len(checkpoint_files(out)) > 1
    want, got = _tensors(expected), _tensors(out)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _json(out / name) == _json(expected / name), name
    ids = torch.randint(0, small.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(expected).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(a, b)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failed_slim_leaves_no_folder(tmp_path):
    model, tok = make_tiny_pair()
    model.save_pretrained(tmp_path / "dense")
    prof = S.accumulate(model, torch.randint(0, len(tok), (2, 8)), 2)
    plan = P.build_plan(prof, model, PruneConfig(method="contextual", target=0.3, multiple_of=4), domain="d")
    bad = {"model.layers.0.mlp.down_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="does not match"):
        slim_to_folder(LayerStore(tmp_path / "dense"), plan, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(refit.RefitError, match="needs its new weights"):
        slim_to_folder(LayerStore(tmp_path / "dense"), dataclasses.replace(plan, reconstruct=True), tmp_path / "out")


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text", "phi", "gpt2"])
def test_streamed_slimming_of_other_architectures(tmp_path, arch):
    """Biases (Qwen2, Phi), q/k norms and local/global layer types (Gemma 3), Conv1D and position embeddings
    (GPT-2): the same tensors as slim.slim, in several shards."""
    from minigpt.archs import kv_prunable
    from tests.test_streaming import IDS, make

    model = make(arch)
    model.save_pretrained(tmp_path / "dense")
    prof = S.accumulate(model, IDS, 2)
    cfg = PruneConfig(method="contextual", target=0.3, multiple_of=4, reconstruct=False,
                      kv_groups=1 if kv_prunable(model) and arch != "gemma3_text" else 0)
    plan = P.build_plan(prof, model, cfg, domain="d")
    SL.save_expert(SL.slim(model, plan), _NoTokenizer(), tmp_path / "expected")
    out = slim_to_folder(LayerStore(tmp_path / "dense"), plan, tmp_path / "streamed", max_shard_bytes=5000)
    want, got = _tensors(tmp_path / "expected"), _tensors(out)
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    assert _json(out / "config.json") == _json(tmp_path / "expected" / "config.json")


class _NoTokenizer:
    def save_pretrained(self, _folder):
        pass
