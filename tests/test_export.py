"""GGUF export (minigpt.export): tiny Llama, Qwen2 and Gemma 3 experts written with the gguf package and read back
with transformers' GGUF loader give the expert's logits (f16: fp16 rounding only) and its tokenization; what cannot
be exported stops in one line with nothing written; the CLI ships the files with the expert's card and terms files.
The real SmolLM2-135M expert is checked in a slow test (f16 logits, q8_0 perplexity within 1% of f16)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama, make_tiny_pair, make_tiny_tokenizer
from minigpt import export as EX
from minigpt.config import ConfigError

TEXTS = ["the quick brown fox jumps over the lazy dog", "a licence grants permission to copy, modify 1234 ",
         "  spaces,\nnew lines\tand tabs<eos>the end"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"


def _save(model, tok, folder: Path) -> Path:
    tok.chat_template = TEMPLATE
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _blocks(tok, n: int = 2) -> torch.Tensor:
    ids = tok(" ".join(TEXTS) * 2)["input_ids"][: 24 * n]
    return torch.tensor(ids).reshape(n, 24)


def _fp16_rounded(model):
    """The expert as an f16 file holds it: 2-D weights rounded to float16, 1-D tensors exact."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return m


def _round_trip(model, tok, tmp_path: Path, outtype: str = "f16"):
    folder = _save(model, tok, tmp_path / "expert")
    info = EX.export_gguf(folder, tmp_path / "gguf" / f"e.{outtype}.gguf", outtype)
    loaded, gtok = EX.load_gguf(tmp_path / "gguf" / info["file"])
    return folder, info, loaded, gtok


def _tiny_qwen2(vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)  # biases and norms too
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_llama_f16_round_trip_gives_the_experts_logits_and_tokens(tmp_path, tie):
    model, tok = make_tiny_pair(tie=tie)
    folder, info, loaded, gtok = _round_trip(model, tok, tmp_path)
    assert info["tensors"] == len(model.state_dict()) - tie and info["quantized"] == 0
    assert loaded.config.tie_word_embeddings == tie and loaded.config.intermediate_size == 64
    x = _blocks(tok)
    with torch.no_grad():
        got = loaded(x).logits
        # Exactly the expert with its weights in fp16 (query/key rows permuted and back), and near the fp32 expert.
        torch.testing.assert_close(got, _fp16_rounded(model)(x).logits, rtol=1e-4, atol=1e-4)
        ref = model(x).logits
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
    for text in TEXTS:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text
    assert gtok.eos_token == "<eos>" and gtok.chat_template == TEMPLATE


def test_llama_with_pruned_heads_keeps_its_head_size(tmp_path):
    """A KV-pruned expert has fewer heads of the same size (head_dim != hidden / heads): rope.dimension_count and
    attention.key_length carry it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=256, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    _, _, loaded, _ = _round_trip(model, tok, tmp_path)
    assert loaded.config.head_dim == 16 and loaded.config.num_attention_heads == 2
    x = _blocks(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, _fp16_rounded(model)(x).logits, rtol=1e-4, atol=1e-4)


def test_qwen2_f16_round_trip_with_biases_and_qwen2_splitting(tmp_path):
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = make_tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = _tiny_qwen2(len(tok))
    folder, info, loaded, gtok = _round_trip(model, tok, tmp_path)
    assert EX.tokenizer_metadata(folder, len(tok))["pre"] == "qwen2"
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.model.layers[0].self_attn.q_proj.bias is not None
    x = _blocks(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, _fp16_rounded(model)(x).logits, rtol=1e-4, atol=1e-4)
    for text in TEXTS:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text


def test_q8_0_quantizes_the_matrices_and_stays_near_f16(tmp_path):
    model, tok = make_tiny_pair()
    folder = _save(model, tok, tmp_path / "expert")
    f16 = EX.export_gguf(folder, tmp_path / "out" / "e.F16.gguf", "f16")
    q8 = EX.export_gguf(folder, tmp_path / "out" / "e.Q8_0.gguf", "q8_0")
    # Every matrix whose rows split into 32-value blocks is 8-bit (the tiny MLP's down projection, 64 wide, too).
    assert q8["quantized"] == 1 + 3 * 7 and q8["bytes"] < 0.65 * f16["bytes"]
    x = _blocks(tok)
    res = EX.verify(folder, [tmp_path / "out" / f["file"] for f in (f16, q8)], x)
    assert res[0]["max_abs_logit_diff"] < 1e-2 * res[0]["max_abs_logit"]
    assert abs(res[1]["ppl_ratio"] - 1) < 0.05 and res[1]["max_abs_logit_diff"] < 0.2 * res[1]["max_abs_logit"]


def test_vocabulary_pruned_expert_exports_its_own_tokenizer(tmp_path):
    from minigpt import vocab as V

    model, tok = make_tiny_pair()
    keep = V.closure(tok, tok(TEXTS[0])["input_ids"])
    small_tok = V.prune_tokenizer(tok, keep)
    small = make_tiny_llama(vocab=len(keep))
    small.config.eos_token_id = small.config.pad_token_id = small_tok.eos_token_id
    _, _, loaded, gtok = _round_trip(small, small_tok, tmp_path)
    assert loaded.config.vocab_size == len(keep)
    for text in TEXTS:
        assert gtok(text)["input_ids"] == small_tok(text)["input_ids"], text


def test_what_cannot_be_exported_stops_in_one_line_with_nothing_written(tmp_path):
    model, tok = make_tiny_pair()
    folder = _save(model, tok, tmp_path / "expert")
    out = tmp_path / "out"
    cfg = json.loads((folder / "config.json").read_text())
    cases = {
        "not an expert": (tmp_path / "empty", None, "is not an expert folder"),
        "gpt2": (folder, {**cfg, "model_type": "gpt2"}, "cannot export model_type 'gpt2'"),
        "rope": (folder, {**cfg, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
                 "rope scaling llama3"),
        "quantized": (folder, {**cfg, "quantization_config": {"quant_method": "torchao"}}, "quantized weights"),
    }
    (tmp_path / "empty").mkdir()
    for name, (src, patched, words) in cases.items():
        if patched is not None:
            (folder / "config.json").write_text(json.dumps(patched))
        with pytest.raises(ConfigError, match=words) as e:
            EX.export_gguf(src, out / "x.gguf", "f16")
        assert "\n" not in str(e.value), name
        assert not out.exists(), name
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Llama .*Qwen2 .*Gemma 3"):  # a real GPT-2 checkpoint: the supported named
        EX.export_gguf(_gpt2_folder(tmp_path), out / "x.gguf", "f16")
    assert not out.exists()


def _gpt2_folder(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tiny_tokenizer()
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_export_writes_the_files_with_the_card_and_terms(tmp_path, capsys):
    from minigpt import licence as LI
    from minigpt.cli import main

    model, tok = make_tiny_pair()
    expert = _save(model, tok, tmp_path / "run" / "experts" / "legal" / "pruned")
    (expert / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/base\ntags:\n- minigpt\n---\n\n"
                                      "# card\n")
    (expert / "LICENSE").write_text("the licence text")
    (expert / "NOTICE").write_text("the notice")
    assert main(["export", str(expert), "--gguf", "f16", "--gguf", "q8_0"]) == 0
    out = tmp_path / "run" / "experts" / "legal" / "gguf"
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "NOTICE", "README.md", "export.json",
                                                      "legal-pruned.F16.gguf", "legal-pruned.Q8_0.gguf"]
    card = (out / "README.md").read_text()
    meta = LI.front_matter(card)
    assert meta["license"] == "apache-2.0" and "gguf" in meta["tags"] and "legal-pruned.Q8_0.gguf" in card
    assert "read back with transformers" in capsys.readouterr().out
    # The files carry the card's licence and base model.
    from gguf import GGUFReader

    fields = GGUFReader(str(out / "legal-pruned.F16.gguf")).fields
    assert fields["general.license"].contents() == "apache-2.0"
    assert fields["general.base_model.0.name"].contents() == "org/base"
    # Exporting again replaces the card's GGUF section instead of adding a second one.
    assert main(["export", str(expert), "--no-verify"]) == 0
    assert (out / "README.md").read_text().count("### GGUF (llama.cpp)") == 1


def test_cli_export_of_a_non_expert_is_one_line(tmp_path, capsys):
    from minigpt.cli import main

    (tmp_path / "nothing").mkdir()
    assert main(["export", str(tmp_path / "nothing"), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minigpt: error:") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing"]


@pytest.mark.slow
def test_real_expert_exports_to_gguf(smollm2_dir, tmp_path):
    """SmolLM2-135M pruned by 25% (compensated, a stock 1024-wide checkpoint): f16 logits are the expert's within
    fp16 rounding, q8_0 perplexity is within 1% of f16's on text calibration never saw, tokenization is the same."""
    from minigpt import models, plan as P, slim, stats as S
    from minigpt.config import PruneConfig

    torch.set_num_threads(2)
    dense, tok = models.load_model(smollm2_dir), models.load_tokenizer(smollm2_dir)
    import minigpt

    code = "".join(open(f).read() for f in sorted(Path(minigpt.__file__).parent.glob("*.py")))
    calib = torch.tensor(tok(code)["input_ids"][: 16 * 128]).reshape(16, 128)
    prof = S.accumulate(dense, calib, batch_size=2, spec=S.StatSpec(gram=True))
    plan = P.build_plan(prof, dense, PruneConfig(method="contextual", target=0.25, sequential=False), domain="code")
    small, small_tok = slim.slim_expert(dense, tok, plan, prof)
    del dense
    expert = slim.save_expert(small, small_tok, tmp_path / "expert")
    held_text = Path("/usr/share/common-licenses/GPL-3").read_text()
    held = torch.tensor(tok(held_text)["input_ids"][: 4 * 256]).reshape(4, 256)
    files = [EX.export_gguf(expert, tmp_path / "gguf" / f"e.{t}.gguf", t) for t in ("f16", "q8_0")]
    f16, q8 = EX.verify(expert, [tmp_path / "gguf" / f["file"] for f in files], held)
    assert f16["max_abs_logit_diff"] < 1e-2 * f16["max_abs_logit"]
    assert abs(f16["ppl_ratio"] - 1) < 1e-3
    assert abs(q8["ppl_gguf"] / f16["ppl_gguf"] - 1) < 0.01, (q8, f16)
    _, gtok = EX.load_gguf(tmp_path / "gguf" / files[0]["file"])
    sample = held_text[:2000] + "<|im_start|>user\nhi 12345<|im_end|>"
    assert gtok(sample)["input_ids"] == small_tok(sample)["input_ids"]
    assert gtok.chat_template == small_tok.chat_template and gtok.eos_token == small_tok.eos_token


def test_export_stage_ships_a_verified_gguf_folder(tmp_path):
    """The pipeline's export stage: the final expert's GGUF files read back on held-out blocks, export.json, the
    expert's terms files and a card (library gguf) that the job later rewrites with the measured figures."""
    import random

    from minigpt import card as CA, experts as X, plan as P, slim, stages as S
    from minigpt.jobfile import parse
    from minigpt.pipeline import Pipeline

    model, tok = make_tiny_pair()
    base = _save(model, tok, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n")
    (base / "LICENSE").write_text("MIT licence text")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = " ".join(TEXTS).split()
    for i in range(40):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)))
    cfg = parse({"name": "tiny", "model": str(base), "output_dir": str(tmp_path / "run"),
                 "domains": {"legal": {"sources": [{"kind": "text", "path": str(corpus)}]}},
                 "data": {"block_size": 16, "calib_tokens": 64, "heldout_tokens": 64, "eval_tokens": 16},
                 "recover": {"enabled": False}, "export": {"enabled": True, "gguf": ["f16", "q8_0"],
                                                           "verify_blocks": 2}})
    p = Pipeline(cfg)
    p.model_dir = base
    S.prepare(p, "legal")
    plan = P.PruningPlan(domain="legal", method="contextual", target=0.25, model_type="llama", num_layers=3,
                         intermediate_size=64, layers=tuple(P.LayerPlan(i, tuple(range(48))) for i in range(3)),
                         params={"dense_non_embedding": 100, "non_embedding": 75})
    plan.save(p.layout.plan("legal"))
    small = slim.slim(model, plan)
    slim.save_expert(small, tok, p.layout.expert("legal", "pruned"),
                     extra_files=X.ship_files(p, "legal", "pruned", plan, "LlamaForCausalLM"))
    X.export(p, "legal")
    out = p.layout.expert("legal", "gguf")
    assert sorted(x.name for x in out.iterdir()) == ["LICENSE", "NOTICE", "README.md", "export.json",
                                                     "legal-pruned.F16.gguf", "legal-pruned.Q8_0.gguf"]
    rec = json.loads((out / "export.json").read_text())
    f16, q8 = rec["files"]
    assert rec["kind"] == "pruned" and f16["verify"]["blocks"] == 2
    assert f16["verify"]["max_abs_logit_diff"] < 1e-2 * f16["verify"]["max_abs_logit"]
    assert q8["quantized"] > 0 and q8["verify"]["ppl_ratio"] > 0
    meta = CA.parse((out / "README.md").read_text())
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"] and meta["license"] == "mit"
    row = {"dense_ppl": 300.0, "pruned_ppl": 330.0, "pruned_ppl_ratio": 1.1, "pruned_ppl_ratio_ci": [1.05, 1.15],
           "pruned_bpb": 2.0, "oos": {}}
    X.refresh_cards(p, {"domains": {"legal": row}}, {"dense": "dense", "models": {}})
    card = (out / "README.md").read_text()
    assert "1.100× [1.050–1.150]" in card and "legal-pruned.Q8_0.gguf" in card
    assert "read back with transformers" in card
    assert "1.100× [1.050–1.150]" in (p.layout.expert("legal", "pruned") / "README.md").read_text()


def test_export_section_is_opt_in_and_checked():
    from minigpt.optconfig import ExportConfig
    from minigpt.jobfile import parse

    cfg = parse({"name": "x", "model": "smollm2-135m", "domains": {"d": {"sources": [{"kind": "licenses"}]}}})
    assert cfg.export == ExportConfig() and not cfg.export.enabled and cfg.export.gguf == ("f16",)
    for bad in ({"gguf": ["q4_k"]}, {"gguf": ["f16", "f16"]}, {"gguf": []}, {"verify_blocks": -1}):
        with pytest.raises(ConfigError, match="export"):
            ExportConfig(**bad)


# ------------------------------------------------------------------------------------------ Gemma 3


def _tiny_gemma_tokenizer():
    """A Gemma-style sentencepiece tokenizer made the way a Gemma expert's is (transformers' reading of Gemma's
    GGUF): control tokens, user-defined runs of newlines and spaces, the 256 byte tokens, then pieces in merge
    order; every text starts with <bos>."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import add_gguf_special_tokens, gemma_tokenizer

    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user = ["[multimodal]", "\n", "\n\n", "  ", "   ", "<table>"]
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz,.0123456789", "\u2581t", "th", "he", "\u2581th", "\u2581the",
              "in", "\u2581a", "er", "on", "\u2581o", "an", "re", "\u2581s", "es", "en", "ic", "\u2581c", "\u2581l",
              "\u2581f", "ox", "\u2581fox"]
    spec = {"tokens": control + user + [f"<0x{i:02X}>" for i in range(256)] + pieces, "tokenizer_type": "llama",
            "token_type": [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * len(pieces)}
    tok = add_gguf_special_tokens(gemma_tokenizer(spec), spec)
    tok.add_bos_token = True
    return tok


def _tiny_gemma3(vocab: int):
    """Six layers (five sliding, one global: llama.cpp's Gemma 3 pattern), a window of 8 tokens, one KV head of
    size 256 (query_pre_attn_scalar = head_dim, as llama.cpp assumes)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(2)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=8, max_position_embeddings=128, rope_theta=1e6, pad_token_id=0,
                           bos_token_id=2, eos_token_id=1)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)  # every norm too
    return model


def test_gemma3_round_trip_gives_the_experts_logits_and_sentencepiece_tokens(tmp_path):
    """Norms shifted by one, sliding and global layers, the sentencepiece vocabulary with its scores, byte tokens
    and runs of spaces spelled as llama.cpp spells them; transformers reads back the expert's logits and tokens."""
    import gguf

    tok = _tiny_gemma_tokenizer()
    model = _tiny_gemma3(len(tok))
    folder, info, loaded, gtok = _round_trip(model, tok, tmp_path)
    assert type(loaded).__name__ == "Gemma3ForCausalLM" and loaded.config.layer_types == model.config.layer_types
    assert loaded.config.sliding_window == 8 and info["tensors"] == len(model.state_dict()) - 1  # the tied head
    x = torch.tensor(tok(" ".join(TEXTS) * 2)["input_ids"][:48]).reshape(2, 24)  # 24 tokens: the window slides
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, _fp16_rounded(model)(x).logits, rtol=1e-4, atol=1e-4)
    for text in TEXTS + ["the fox <table>  x\n\n", "\u00e9t\u00e9 \u2603"]:  # byte fallback for the last
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text
    assert gtok.chat_template == TEMPLATE

    r = gguf.GGUFReader(str(tmp_path / "gguf" / info["file"]))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    assert r.fields["general.architecture"].contents() == "gemma3"
    assert r.fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.merges" not in r.fields
    at = {t: i for i, t in enumerate(tokens)}
    assert (types[at["<bos>"]], types[at["  "]], types[at["\n"]], types[at["<0x41>"]], types[at["th"]]) == \
        (EX.CONTROL, EX.USER_DEFINED, EX.USER_DEFINED, EX.BYTE, EX.NORMAL)
    assert "\u2581\u2581" not in at  # transformers' respelling of Gemma's runs of spaces is undone
    assert (scores[at["\u2581"]], scores[at["a"]], scores[at["<0x00>"]], scores[at["<eos>"]]) == (0.0, -1.0, 0.0, -1000.0)
    assert r.fields["gemma3.attention.sliding_window"].contents() == 8 and r.fields["tokenizer.ggml.bos_token_id"].contents() == at["<bos>"]
    stored = {t.name: t for t in r.tensors}["blk.0.attn_norm.weight"].data
    assert np.allclose(stored, model.model.layers[0].input_layernorm.weight.detach().numpy() + 1)


def test_gemma3_q8_0_stays_near_the_expert(tmp_path):
    tok = _tiny_gemma_tokenizer()
    model = _tiny_gemma3(len(tok))
    folder = _save(model, tok, tmp_path / "expert")
    q8 = EX.export_gguf(folder, tmp_path / "out" / "e.Q8_0.gguf", "q8_0")
    x = torch.tensor(tok(" ".join(TEXTS) * 2)["input_ids"][:48]).reshape(2, 24)
    (res,) = EX.verify(folder, [tmp_path / "out" / q8["file"]], x)
    assert q8["quantized"] > 0 and abs(res["ppl_ratio"] - 1) < 0.05


@pytest.mark.parametrize("over, words", [
    ({"layer_types": ["full_attention"] + ["sliding_attention"] * 5}, "layer_types other than every 6th"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}}, "sliding layers' rope_theta"),
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 != head_dim 256"),
    ({"final_logit_softcapping": 30.0}, "logit soft-capping"),
])
def test_gemma3_layouts_llama_cpp_fixes_otherwise_stop_in_one_line(tmp_path, over, words):
    tok = _tiny_gemma_tokenizer()
    folder = _save(_tiny_gemma3(len(tok)), tok, tmp_path / "expert")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **over}))
    with pytest.raises(ConfigError, match=words) as e:
        EX.export_gguf(folder, tmp_path / "out" / "x.gguf", "f16")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
