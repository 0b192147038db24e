"""Layer-streamed execution (issue 28): lazy per-layer reading of checkpoints, the streamed forward (equal to the
in-memory model, one layer resident), the hidden-state buffer's spilling, sharded writing that plain transformers
loads, and memory prediction from the config. Tiny random models built in-process, a few seconds in all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from minigpt.archs import decoder_layers
from minigpt.hidden import HiddenBuffer
from minigpt.layerstore import INDEX, SINGLE, LayerStore
from minigpt.memory import model_sizes, peak_rss_mib, predict_memory
from minigpt.shardwriter import ShardedWriter, shard_name, write_state
from minigpt.streamed import StreamedDecoder, resident_parameters, streamed_forward


from tests.conftest import TINY_IDS, TINY_KW

pytestmark = pytest.mark.usefixtures("one_thread")
KW, IDS_ = TINY_KW, TINY_IDS


def _config(arch: str):
    import transformers as T

    if arch == "llama":  # tied embeddings: the head has no lm_head of its own
        return T.LlamaConfig(**KW, tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v biases, untied head, sliding window on the later layers
        return T.Qwen2Config(**KW, tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                             max_window_layers=1)
    if arch == "gemma3_text":  # scaled embeddings (a buffer), local/global layers with their own rotary tables
        return T.Gemma3TextConfig(**KW, **IDS_, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "phi":  # final_layernorm with a bias, lm_head bias
        return T.PhiConfig(**KW, partial_rotary_factor=0.5)
    if arch == "gpt2":  # transformer.h, token and position embeddings
        return T.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64, **IDS_)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "gemma3_text", "phi", "gpt2")
IDS = torch.randint(0, 96, (5, 20), generator=torch.Generator().manual_seed(5))


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(arch))
    with torch.no_grad():  # random init is near-silent; larger weights make layers differ
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def saved(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def layer_outputs(model, ids) -> list[torch.Tensor]:
    """Each decoder layer's output in the model's own forward."""
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def own_state(model) -> dict[str, torch.Tensor]:
    """What save_pretrained writes: parameters (a tied one once) and persistent buffers."""
    params = dict(model.named_parameters())
    persistent = model.state_dict()
    return {**params, **{n: b for n, b in model.named_buffers() if n in persistent}}


# -- LayerStore ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, "8KB"])
def test_layer_store_reads_each_part_of_single_and_sharded_checkpoints(tmp_path, shard):
    model = make("qwen2")
    folder = saved(model, tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    assert (folder / (INDEX if shard else SINGLE)).is_file()
    store = LayerStore(folder)
    state = model.state_dict()
    assert store.num_layers == 3 and store.config.model_type == "qwen2"
    for i in range(store.num_layers):
        layer = store.layer_state(i)
        assert set(layer) == set(decoder_layers(model)[i].state_dict())
        for k, v in layer.items():
            torch.testing.assert_close(v, state[f"model.layers.{i}.{k}"], rtol=0, atol=0)
    assert list(store.embed_state()) == ["model.embed_tokens.weight"]
    assert sorted(store.head_state()) == ["lm_head.weight", "model.norm.weight"]
    # Sizes come from the headers alone and add up to every byte of weights in the folder.
    parts = store.embed_bytes() + store.head_bytes() + sum(store.layer_bytes(i) for i in range(3))
    assert parts == store.total_bytes() == sum(v.numel() * v.element_size() for v in state.values())
    assert store.layer_bytes(1) == sum(v.numel() * 4 for v in decoder_layers(model)[1].state_dict().values())


def test_layer_store_tied_head_and_dtype(tmp_path):
    model = make("llama")
    store = LayerStore(saved(model, tmp_path / "m"), dtype=torch.bfloat16)
    assert store.tied and list(store.head_state()) == ["model.norm.weight"]  # lm_head is the embedding
    t = store.tensor("model.layers.0.mlp.up_proj.weight")
    assert t.dtype == torch.bfloat16
    torch.testing.assert_close(t, model.model.layers[0].mlp.up_proj.weight.detach().bfloat16())
    before = t.clone()
    t.add_(1)  # an owned copy: neither the file nor a later read changes
    assert torch.equal(store.tensor("model.layers.0.mlp.up_proj.weight"), before)


# -- streamed forward -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_forward_equals_the_in_memory_model(arch, tmp_path):
    """Every layer's output and the logits equal the model's own forward (fp32), with one decoder layer resident
    while it runs: the embedding, head and that layer are all the parameters holding storage."""
    model = make(arch)
    store = LayerStore(saved(model, tmp_path / "m"))
    expected = layer_outputs(model, IDS)
    with torch.no_grad():
        logits = model(IDS).logits
    layers = decoder_layers(model)
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in layers.parameters())
    seen: dict[int, list[torch.Tensor]] = {}
    resident: list[int] = []

    def on_layer(i, layer):
        resident.append(resident_parameters(dec.model))
        h = layer.register_forward_hook(lambda _m, _a, o: seen.setdefault(i, []).append(
            o[0] if isinstance(o, tuple) else o))
        return h.remove

    dec = StreamedDecoder(store)
    got = streamed_forward(dec, IDS, batch_size=2, on_layer=on_layer)
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    for i, out in enumerate(expected):
        torch.testing.assert_close(torch.cat(seen[i]), out, rtol=1e-5, atol=1e-5)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert resident == [outside + per_layer] * len(layers)
    assert resident_parameters(dec.model) == outside  # every layer back on the meta device
    assert all(p.device.type == "meta" for p in decoder_layers(dec.model).parameters())


def test_streamed_forward_of_a_sharded_bf16_checkpoint(tmp_path):
    """A sharded checkpoint stored in bf16 streams in the stored dtype or converted to fp32 on reading, equal to
    the model from_pretrained loads in the same dtype (Gemma 3: its embedding scale is a buffer built in it)."""
    folder = saved(make("gemma3_text").to(torch.bfloat16), tmp_path / "m", max_shard_size="8KB")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()(IDS).logits
        dec = StreamedDecoder(LayerStore(folder), dtype=None if dtype == torch.bfloat16 else dtype)
        assert dec.dtype == dtype and dec.model.get_input_embeddings().weight.dtype == dtype
        torch.testing.assert_close(streamed_forward(dec, IDS, batch_size=3), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_statistics_equal_the_in_memory_pass(arch, tmp_path):
    """accumulate_streamed (hooks on the resident layer only, into its row) adds what stats.accumulate adds on the
    whole model, Gram statistics included, into an existing profile too; depth spans are refused."""
    from minigpt import stats as S
    from minigpt.streamed import accumulate_streamed

    model = make(arch)
    dec = StreamedDecoder(LayerStore(saved(model, tmp_path / "m")))
    spec = S.StatSpec(gram=True)
    expected = S.accumulate(model, IDS[3:], 2, stats=S.accumulate(model, IDS[:3], 2, spec=spec))
    got = accumulate_streamed(dec, IDS[3:], 2, accumulate_streamed(dec, IDS[:3], 2, spec=spec),
                              hidden_budget=0, spill_dir=str(tmp_path))
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert resident_parameters(dec.model) < sum(p.numel() for p in model.parameters())  # no layer left resident
    with pytest.raises(ValueError, match="depth-span"):
        accumulate_streamed(dec, IDS, 2, spec=S.StatSpec(depth_spans=(1,)))


# -- hidden-state buffer ----------------------------------------------------------------------------------------------

def test_spilling_every_batch_gives_the_same_logits(tmp_path):
    store = LayerStore(saved(make("llama"), tmp_path / "m"))
    dec = StreamedDecoder(store)
    unlimited = streamed_forward(dec, IDS, batch_size=2, hidden_budget=None)
    spilled = streamed_forward(dec, IDS, batch_size=2, hidden_budget=0, spill_dir=str(tmp_path))
    assert torch.equal(unlimited, spilled)
    assert not list(tmp_path.glob("minigpt-hidden-*"))  # spill files removed afterwards


def test_hidden_buffer_keeps_what_fits_and_spills_the_rest(tmp_path):
    a = torch.randn(2, 5, 8)
    b = torch.randn(2, 5, 8).bfloat16()
    with HiddenBuffer(budget_bytes=a.numel() * 4, spill_dir=tmp_path) as buf:
        buf.put(0, a)
        buf.put(1, b)  # over the budget: spilled
        assert not buf.spilled(0) and buf.spilled(1)
        assert buf.memory_bytes == a.numel() * 4 and buf.spilled_bytes == b.numel() * 2
        assert torch.equal(buf.get(1), b) and buf.get(1).dtype == torch.bfloat16
        buf.put(1, b + 1)  # rewritten in place
        assert torch.equal(buf.get(1), b + 1)
        buf.put(0, a[:1])  # smaller now: entry 1 would fit, but entries move only when written
        assert buf.keys() == [0, 1] and len(buf) == 2
        spill = next(tmp_path.glob("minigpt-hidden-*"))
    assert not spill.exists()
    with pytest.raises(ValueError):
        HiddenBuffer(-1)


# -- sharded writing --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_shard_bytes", [10**9, 6000])
def test_sharded_writer_output_loads_with_plain_transformers(tmp_path, max_shard_bytes):
    model = make("qwen2")
    out = tmp_path / "out"
    files = write_state(out, own_state(model), max_shard_bytes)
    model.config.save_pretrained(out)
    if max_shard_bytes > 10**6:
        assert [f.name for f in files] == [SINGLE] and not (out / INDEX).exists()
    else:
        n = len(files)
        assert n > 2 and [f.name for f in files] == [shard_name(k + 1, n) for k in range(n)]
        index = json.loads((out / INDEX).read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
        assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in files) - sum(
            8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
        assert index["metadata"]["total_parameters"] == sum(p.numel() for p in model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_sharded_writer_never_leaves_a_checkpoint_half_written(tmp_path):
    out = tmp_path / "out"
    w = ShardedWriter(out, max_shard_bytes=100)
    w.add("a", torch.randn(30))
    w.add("b", torch.randn(30))  # the first shard is finished: on disk under a temporary name only
    assert not list(out.glob("model*"))
    with pytest.raises(ValueError):
        w.add("a", torch.randn(3))
    w.abort()
    assert not list(out.iterdir())
    with pytest.raises(RuntimeError), ShardedWriter(out) as w2:
        w2.add("a", torch.randn(3))
        raise RuntimeError("killed")
    assert not list(out.iterdir())
    write_state(out, {"a": torch.randn(3)})
    with pytest.raises(FileExistsError):
        ShardedWriter(out)


def test_mixed_dtypes_are_laid_out_aligned(tmp_path):
    """An odd-sized bf16 tensor before an fp32 one: each still starts at a multiple of its element size."""
    tensors = {"odd": torch.randn(3).bfloat16(), "f": torch.randn(5), "i": torch.arange(7, dtype=torch.int64),
               "flag": torch.tensor([True, False, True])}
    write_state(tmp_path, tensors)
    with safe_open(str(tmp_path / SINGLE), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    raw = (tmp_path / SINGLE).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0
    sizes = {"BF16": 2, "F32": 4, "I64": 8, "BOOL": 1}
    assert all(h["data_offsets"][0] % sizes[h["dtype"]] == 0 for k, h in header.items() if k != "__metadata__")


def test_a_checkpoint_copied_one_layer_at_a_time_loads_unchanged(tmp_path):
    """The slim path in miniature: read a layer, write it, drop it (the store's reads feed the writer)."""
    model = make("gemma3_text")
    store = LayerStore(saved(model, tmp_path / "m"))
    out = tmp_path / "copy"
    with ShardedWriter(out, max_shard_bytes=9000) as w:
        w.add_state(store.embed_state())
        for i, state in store.layers():
            w.add_state(state, prefix=store.layer_prefix(i))
        w.add_state(store.head_state())
    store.config.save_pretrained(out)
    assert (out / INDEX).is_file()
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, model(IDS).logits)


# -- memory prediction ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_predicted_parameter_bytes_are_exact(arch, tmp_path):
    model = make(arch)
    sizes = model_sizes(model.config)
    layers = decoder_layers(model)
    assert sizes.layer_params == sum(p.numel() for p in layers[0].parameters())
    assert sizes.total_params == sum(p.numel() for p in model.parameters())
    assert sizes.embed_params == sum(m.weight.numel() for n, m in model.named_modules()
                                     if isinstance(m, torch.nn.Embedding))
    est = predict_memory(sizes, torch.bfloat16, batch=2, seq=20)
    store = LayerStore(saved(model.to(torch.bfloat16), tmp_path / "m"))
    assert (est.embed_bytes, est.layer_bytes, est.head_bytes) == (store.embed_bytes(), store.layer_bytes(0),
                                                                 store.head_bytes())
    assert est.embed_bytes + est.all_layers_bytes + est.head_bytes == store.total_bytes()


def test_predicted_peaks_add_their_terms():
    sizes = model_sizes(_config("llama"))
    plain = predict_memory(sizes, "float32", batch=4, seq=16)
    assert plain.hidden_bytes == 0
    assert plain.whole_peak - plain.streamed_peak == (sizes.num_layers - 1) * plain.layer_bytes
    held = predict_memory(sizes, "float32", batch=4, seq=16, tokens=1000, base_bytes=7)
    assert held.hidden_bytes == 1000 * 32 * 4 and held.streamed_peak == plain.streamed_peak + held.hidden_bytes + 7
    capped = predict_memory(sizes, "float32", batch=4, seq=16, tokens=1000, hidden_budget=100)
    assert capped.hidden_bytes == 100
    assert predict_memory(sizes, "float32", batch=8, seq=16).activation_bytes > plain.activation_bytes


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_peak_rss_of_a_child_process_is_its_own():
    """What the memory probes measure in fresh processes must not be their parent's: getrusage's ru_maxrss is
    carried across exec from the address space it replaced (Python's subprocess vforks), so a child of a 1 GB test
    runner would report 1 GB (measured: 812 MiB reported by a child holding 11). peak_rss_mib reads VmHWM."""
    ballast = b"\1" * (600 * 2**20)  # written, so every page counts in this process's RSS
    parent = peak_rss_mib()
    assert parent >= 600
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "from minigpt.memory import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    assert 0 < child < parent - 300, (child, parent)  # torch and minigpt.memory alone: a few hundred MiB
    del ballast
