"""Sequential pruning without a copy of the model (issue 28): runners over a checkpoint folder (one layer resident,
streams in HiddenBuffers, spilled or not), a driver reading one layer at a time from a LayerStore, and in-memory
runners that share the caller's weights. All give the plan and the refit weights of the in-memory path."""

import pytest
import torch

from minigpt import sequential as Q
from minigpt.archs import decoder_layers
from minigpt.config import PruneConfig
from minigpt.layerstore import LayerStore
from minigpt.streamed import resident_parameters
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(1))
GENERAL = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "llama"
    make_tiny_llama(tie=False).save_pretrained(path)  # untied: the head has an lm_head of its own
    return path


def _in_memory(model, cfg, shares, general=None, weight=0.0):
    runners = [Q.LayerRunner(model, s, 2, g, weight) for s, g in zip(shares, general or [None] * len(shares))]
    return Q.prune_sequential(model, runners, cfg, domain="d")


CONFIGS = {
    "layer": PruneConfig(method="obs", target=0.4, kv_groups=1, multiple_of=4, sequential=True, refit_target="layer"),
    "stream": PruneConfig(method="obs", target=0.3, multiple_of=4, sequential=True, refit_target="stream",
                          stream_attn=True),
    "wanda": PruneConfig(method="wanda-sp", target=0.4, kv_groups=1, multiple_of=4, sequential=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_streamed_runners_and_driver_equal_the_in_memory_path(folder, tmp_path, name):
    """Two runners over the folder (one spilling every batch of both streams), general text on them, and a driver
    reading its layers from a LayerStore: the same plan, and the same new weights to 1e-6."""
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[name]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shares, general = list(CALIB.tensor_split(2)), list(GENERAL.tensor_split(2))
    plan, weights = _in_memory(model, cfg, shares, general, 0.5)
    # The in-memory path copied nothing but changed layers, and wrote nothing into the caller's model.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    runners = [Q.LayerRunner.from_folder(str(folder), shares[0], 2, general[0], 0.5),
               Q.LayerRunner.from_folder(str(folder), shares[1], 2, general[1], 0.5, hidden_budget=0,
                                         spill_dir=str(tmp_path))]
    splan, sweights = Q.prune_sequential(LayerStore(folder), runners, cfg, domain="d")
    assert splan == plan
    assert set(sweights) == set(weights)
    for k, v in weights.items():
        torch.testing.assert_close(sweights[k], v, rtol=1e-6, atol=1e-6)
    # The streamed driver kept none of its new weights in memory: they wait on disk until slimming reads them.
    assert sweights._buffer.memory_bytes == 0 and sweights._buffer.spilled_bytes > 0
    assert not list(tmp_path.glob("minigpt-hidden-*/*.bin"))  # the runners were closed at the end: no spill left


def test_a_streamed_runner_holds_one_layer(folder):
    """Resident parameter elements: only the layer being worked on once the batches are captured (the embedding
    and head go then), none after `advance`; a layer changed by `apply` and released comes back as changed (its
    state is parked in the runner)."""
    runner = Q.LayerRunner.from_folder(str(folder), CALIB, 2)
    model = runner.model
    per_layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    outside = 0  # released after the captures
    assert resident_parameters(model) == outside
    runner.stats(0)
    assert resident_parameters(model) == outside + per_layer
    name = "model.layers.0.mlp.down_proj.weight"
    changed = dict(model.named_parameters())[name].detach() * 0.5
    runner.apply({name: changed})
    runner._layer(1)  # another layer made resident: layer 0's new state is parked, not lost
    assert resident_parameters(model) == outside + per_layer
    assert torch.equal(dict(runner._layer(0).named_parameters())["mlp.down_proj.weight"], changed)
    runner.advance(0)
    assert resident_parameters(model) == outside and not runner._own
    for i in (1, 2):
        runner.stats(i)
        assert resident_parameters(model) == outside + per_layer
        runner.advance(i)
    assert resident_parameters(model) == outside


def test_in_memory_runner_copies_only_the_layers_it_changes():
    model = make_tiny_llama()
    runner = Q.LayerRunner(model, CALIB, 2)
    shared = [a is b for a, b in zip(decoder_layers(runner.model), decoder_layers(model))]
    assert all(shared) and runner.model.get_input_embeddings() is model.get_input_embeddings()
    name = "model.layers.1.mlp.down_proj.weight"
    old = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    runner.advance(0)
    runner.apply({name: torch.zeros_like(old)})
    assert decoder_layers(runner.model)[1] is not model.model.layers[1]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, old)  # the caller's layer is untouched
    runner.advance(1)
    assert decoder_layers(runner.model)[1] is model.model.layers[1]  # done with: the copy is dropped
