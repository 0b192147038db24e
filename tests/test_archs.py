"""Every method on every supported architecture: the slimmed model loads with plain transformers, has the parameter
count the plan predicts, and its logits equal the dense model with the same structures masked — with the kept
weights refit by least squares (prune.reconstruct, the default) and without."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minigpt import plan as P, refit, slim as SL, stats as S
from minigpt.config import ConfigError, PruneConfig, PRUNE_METHODS
from minigpt.models import arch_of, check_architecture, count_parameters, widths

KW = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def make(arch: str, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**KW))
    elif arch == "qwen2":  # q/k/v biases, untied head, sliding window on the later layers
        m = Qwen2ForCausalLM(Qwen2Config(**KW, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                                         max_window_layers=1))
    elif arch == "mistral":
        m = MistralForCausalLM(MistralConfig(**KW, sliding_window=8))
    elif arch == "phi":  # dense fc1/fc2 with biases, partial rotary, lm_head bias
        m = PhiForCausalLM(PhiConfig(**KW, partial_rotary_factor=0.5))
    elif arch == "gpt2":  # Conv1D, fused c_attn, learned positions
        m = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random init is near-silent; larger weights make structures differ
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


ARCHS = ("llama", "qwen2", "mistral", "phi", "gpt2")
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))


def _profiles(model):
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(2))
    spec = S.StatSpec(gram=True, depth_spans=(1,))
    return (S.accumulate(model, calib, 2, spec=spec), S.accumulate(model, other, 2), S.taylor_sums(model, calib, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_slims_to_masked_dense(arch, tmp_path):
    model = make(arch)
    prof, other, grad = _profiles(model)
    for method in PRUNE_METHODS:
        variants = [(0, 0)] if arch == "gpt2" or method == "depth" else [(0, 0), (1, 0), (0, 1), (1, 1)]
        if method == "taylor":  # first-order sums exist per KV group, not per query head
            variants = [v for v in variants if not v[1]]
        for (kv, q), reconstruct in [(v, r) for v in variants for r in (True, False) if method != "obs" or r]:
            cfg = PruneConfig(method=method, target=0.3, kv_groups=kv, q_heads=q, reconstruct=reconstruct)
            plan = P.build_plan(prof, model, cfg, domain="d", other_profiles={"o": other}, grad_stats=grad)
            weights = refit.compensation(model, plan, prof) if reconstruct else None
            assert bool(weights) == reconstruct
            small = SL.slim(model, plan, weights)
            ref = SL.mask(copy.deepcopy(model), plan, weights)
            with torch.no_grad():
                torch.testing.assert_close(small(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
            assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
            assert plan.params["non_embedding"] < plan.params["dense_non_embedding"]
            if kv or q:
                assert widths(small)["kv_heads"] == (1 if kv else 2)
                assert widths(small)["heads"] == widths(small)["kv_heads"] * (1 if q else 2)
                assert small.config.head_dim == widths(model)["head_dim"]
            if method == "depth":
                blocks = small.model.layers if arch != "gpt2" else small.transformer.h
                assert len(blocks) == 3 - len(plan.dropped_layers)
    # One save/reload per architecture with plain transformers (the last plan: depth).
    small.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(back) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, small(IDS).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_kv_pruned_checkpoint_reloads(arch, tmp_path):
    model = make(arch)
    prof, _, _ = _profiles(model)
    plan = P.build_plan(prof, model, PruneConfig(method="contextual", target=0.3, kv_groups=1), domain="d")
    small = SL.slim(model, plan)
    small.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 8)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, small(IDS).logits)


def test_qwen2_depth_keeps_layer_types():
    model = make("qwen2")
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    prof, _, _ = _profiles(model)
    # Layer 2 barely changes its input: lowest block influence.
    prof["block_cos_sum"] = torch.tensor([0.1, 0.2, 0.9], dtype=torch.float64) * prof["tokens"]
    plan = P.build_plan(prof, model, PruneConfig(method="depth", target=0.3, reconstruct=False), domain="d")
    assert plan.dropped_layers == (2,)
    small = SL.slim(model, plan)
    assert small.config.layer_types == ["full_attention", "sliding_attention"]
    assert small.config.num_hidden_layers == 2


def test_gpt2_heads_are_not_prunable_and_say_why():
    model = make("gpt2")
    prof, _, _ = _profiles(model)
    with pytest.raises(ConfigError, match="cannot be pruned into a stock checkpoint"):
        P.build_plan(prof, model, PruneConfig(method="contextual", target=0.2, kv_groups=2), domain="d")


def test_gpt2_mlp_width_is_n_inner(tmp_path):
    model = make("gpt2")
    prof, _, _ = _profiles(model)
    small = SL.slim(model, P.build_plan(prof, model, PruneConfig(target=0.3), domain="d"))
    small.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["n_inner"] == small.transformer.h[0].mlp.c_fc.weight.shape[1] < 64


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(ConfigError, match=r"unsupported architecture 'gpt_neox'; supported: llama, mistral, qwen2, "
                                          r"phi, gpt2$"):
        arch_of(m)
    m.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unsupported architecture"):
        check_architecture(tmp_path)
