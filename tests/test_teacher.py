"""Tests for minigpt.teacher: the cached top-k targets and the dense validation reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import teacher as T
from tests.conftest import make_tiny_llama


def test_topk_logprobs_are_the_largest_of_the_full_softmax():
    model = make_tiny_llama(vocab=64).eval()
    blocks = torch.randint(0, 64, (5, 12))
    ids, logp = T.topk_logprobs(model, blocks, k=8, batch_size=2)
    assert ids.shape == logp.shape == (5, 12, 8) and ids.dtype == torch.int32 and logp.dtype == torch.float16
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=blocks).logits.float(), -1)
    assert torch.allclose(full.gather(-1, ids.long()), logp.float(), atol=2e-2)  # float16 storage
    # Best first, and nothing outside the k is larger than the k-th.
    assert (logp[..., :-1] >= logp[..., 1:]).all()
    outside = full.clone().scatter_(-1, ids.long(), -math.inf).amax(-1)
    assert (outside <= full.gather(-1, ids.long())[..., -1] + 1e-6).all()


def test_nll_sum_and_bits_per_byte():
    model = make_tiny_llama(vocab=64).eval()
    blocks = torch.randint(0, 64, (3, 10))
    total, count = T.nll_sum(model, blocks, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    mean = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert count == 27 and total == pytest.approx(mean * 27, rel=1e-5)
    assert T.bits_per_byte(total, 100) == pytest.approx(total / (math.log(2) * 100))


def test_targets_file_round_trip_and_digest(tmp_path):
    blocks = torch.randint(0, 50, (4, 6))
    assert T.blocks_digest(blocks) == T.blocks_digest(blocks.int()) != T.blocks_digest(blocks.flip(0))
    ids = torch.randint(0, 50, (4, 6, 3), dtype=torch.int32)
    t = T.TeacherTargets(T.blocks_digest(blocks), 3, 2.0, 1.25, 900, ids, torch.randn(4, 6, 3).half())
    T.save_targets(tmp_path / "t.safetensors", t)
    back = T.load_targets(tmp_path / "t.safetensors")
    assert (back.digest, back.k, back.temperature, back.dense_valid_bpb, back.valid_bytes) == (t.digest, 3, 2.0,
                                                                                              1.25, 900)
    assert torch.equal(back.ids, ids) and torch.equal(back.logprobs, t.logprobs)
    meta_only = T.load_targets(tmp_path / "t.safetensors", with_tensors=False)
    assert meta_only.ids is None and meta_only.dense_valid_bpb == 1.25
    T.save_targets(tmp_path / "none.safetensors", T.TeacherTargets("d", 0, 1.0, None, 0))  # not distilling
    assert T.load_targets(tmp_path / "none.safetensors").dense_valid_bpb is None


def test_ray_workers_compute_the_same_targets_as_one_process(ray_local, tmp_path):
    model = make_tiny_llama(vocab=64)
    model.save_pretrained(tmp_path / "dense")
    train, valid = torch.randint(0, 64, (7, 12)), torch.randint(0, 64, (3, 12))
    ids, logp = T.topk_logprobs(model.eval(), train, 5, batch_size=3, temperature=2.0)
    nll, _ = T.nll_sum(model, valid, batch_size=3)
    for streamed in (False, True):  # calibrate.streamed: the tasks read the model one layer at a time
        got = T.compute_targets(tmp_path / "dense", train, valid, 500, digest="x", k=5, temperature=2.0,
                                batch_size=2, workers=2, cpus_per_worker=0.5, label="test", streamed=streamed,
                                hidden_budget=0)
        assert torch.equal(got.ids, ids) and torch.allclose(got.logprobs.float(), logp.float(), atol=1e-3)
        assert got.dense_valid_bpb == pytest.approx(T.bits_per_byte(nll, 500), rel=1e-6)
        assert got.digest == "x" and got.k == 5 and got.temperature == 2.0
