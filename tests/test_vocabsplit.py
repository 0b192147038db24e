"""The embedding and head split into row blocks (minigpt.vocabsplit): the same logits and gradients as the stock
modules, and checkpoints that keep the stock names when a split model is loaded (trainsave.fill_partitioned), saved
(write_engine_weights, row by row through ShardedWriter) and made into an expert (write_expert)."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from minigpt import trainsave as TS
from minigpt import vocabsplit as V
from minigpt.shardwriter import SINGLE, ShardedWriter


@pytest.mark.parametrize("rows,width,cap", [(49152, 576, 2**24), (151936, 1536, 2**24), (300, 32, 1000),
                                            (7, 3, 2), (5, 100, 10)])
def test_blocks_cover_the_rows_in_order_and_stay_under_the_cap(rows, width, cap):
    starts = V.block_starts(rows, width, cap)
    sizes = [b - a for a, b in zip(starts, [*starts[1:], rows])]
    assert starts[0] == 0 and sum(sizes) == rows and all(s > 0 for s in sizes)
    assert all(s * width <= max(cap, width) for s in sizes)  # a row wider than the cap is a block of its own
    assert max(sizes) - min(sizes) <= max(sizes) // 2 + 1  # near-equal blocks, not one remainder sliver


def _gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


def _fill_from(split: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """The split model's blocks (and everything else) from the stock model's state."""
    blocks = V.row_blocks(split)
    with torch.no_grad():
        for n, p in split.named_parameters():
            b = blocks.get(n)
            p.copy_(reference[b.tensor][b.start:b.stop] if b else reference[n])


@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied", "gemma3"])
def test_a_split_model_computes_what_the_stock_one_does(arch):
    stock = _gemma3(300) if arch == "gemma3" else make_tiny_llama(vocab=300, tie=arch == "llama-tied")
    split = copy.deepcopy(stock)
    assert V.split_vocabulary(split, max_params=40 * 32)  # 40 rows a block: 8 blocks, the last one shorter
    emb, head = split.get_input_embeddings(), split.get_output_embeddings()
    assert isinstance(emb, V.SplitEmbedding) and isinstance(head, V.SplitHead) and len(emb.blocks) == 8
    if arch == "gemma3":
        assert emb.scale == pytest.approx(32**0.5)  # Gemma's scaled embedding keeps its scale
    tied = arch != "llama-untied"
    assert all((h.weight is e.weight) == tied for h, e in zip(head.blocks, emb.blocks))
    # The blocks stand for the stock tensors' rows; a tied head is listed once, under the embedding.
    blocks = V.row_blocks(split)
    heads = [b for b in blocks.values() if b.tensor == "lm_head.weight"]
    assert len(blocks) == (8 if tied else 16) and len(heads) == (0 if tied else 8)
    assert [b.start for b in blocks.values() if b.tensor == "model.embed_tokens.weight"] == emb.starts
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in stock.parameters())

    _fill_from(split, stock.state_dict())
    ids = torch.randint(0, 300, (2, 24))
    ids[0, :3] = torch.tensor([0, 299, 40])  # the first and last rows and a block boundary
    out_stock, out_split = stock(input_ids=ids).logits, split(input_ids=ids).logits
    torch.testing.assert_close(out_split, out_stock, atol=1e-6, rtol=0)
    # The same gradients, for the decoder and for each block's rows of the stock embedding.
    for model, out in ((stock, out_stock), (split, out_split)):
        torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1)).backward()
    stock_grads = dict(stock.named_parameters())
    for n, p in split.named_parameters():
        b = blocks.get(n)
        want = stock_grads[b.tensor].grad[b.start:b.stop] if b else stock_grads[n].grad
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)


def test_a_model_whose_vocabulary_fits_one_block_or_whose_head_has_a_bias_stays_whole():
    model = make_tiny_llama(vocab=300)
    assert not V.split_vocabulary(model, max_params=300 * 32)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    model.lm_head = torch.nn.Linear(32, 300, bias=True)
    assert not V.splittable(model) and not V.split_vocabulary(model, max_params=64)
    assert V.vocab_rows(model) == 300


def test_rows_written_in_pieces_make_the_same_file_as_one_tensor(tmp_path):
    t = torch.randn(10, 3)
    with ShardedWriter(tmp_path / "whole") as w:
        w.add("a", t)
        w.add("s", torch.tensor(2.5))
    with ShardedWriter(tmp_path / "rows") as w:
        w.begin_rows("a", t.dtype, (10, 3))
        for piece in (t[:4], t[4:5], t[5:]):
            w.add_rows(piece)
        w.add("s", torch.tensor(2.5))
    assert (tmp_path / "whole" / SINGLE).read_bytes() == (tmp_path / "rows" / SINGLE).read_bytes()

    w = ShardedWriter(tmp_path / "bad")
    w.begin_rows("a", torch.float32, (10, 3))
    w.add_rows(t[:4])
    with pytest.raises(ValueError, match="do not continue"):
        w.add_rows(torch.randn(2, 4))  # another row width
    with pytest.raises(RuntimeError, match="'a' is not complete"):
        w.add("b", t)
    with pytest.raises(RuntimeError, match="'a' is not complete"):
        w.close()
    w.abort()
    assert not list((tmp_path / "bad").iterdir())


@pytest.mark.parametrize("lora", [False, True])
def test_a_split_model_loads_and_saves_stock_checkpoints(tmp_path, lora):
    """fill_partitioned reads each block's rows of the stock tensor; write_engine_weights writes the blocks back as
    the stock tensor, row piece by row piece; write_expert copies it in pieces: the expert equals the student
    (frozen embedding and head, LoRA or not) and loads with plain from_pretrained."""
    tok = make_tiny_tokenizer()
    student = make_tiny_llama(vocab=len(tok), tie=False)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    model = make_tiny_llama(vocab=len(tok), tie=False, seed=5)  # other weights: the fill must replace them all
    assert V.split_vocabulary(model, max_params=64 * 32)
    TS.fill_partitioned(model, tmp_path / "student", "model.layers", rank=0)
    reference = student.state_dict()
    blocks = V.row_blocks(model)
    for n, p in model.named_parameters():
        b = blocks.get(n)
        assert torch.equal(p, reference[b.tensor][b.start:b.stop] if b else reference[n]), n
    scaling = None
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        scaling = 2.0
    TS.write_engine_weights(model, "model.layers", stage=0, rank=0, out_dir=tmp_path / "weights")
    saved = load_file(str(tmp_path / "weights" / SINGLE))
    prefix = "base_model.model." if lora else ""
    assert torch.equal(saved[prefix + "model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    assert torch.equal(saved[prefix + "lm_head.weight"], reference["lm_head.weight"])
    assert not [k for k in saved if ".blocks." in k]
    TS.write_expert(tmp_path / "weights", tmp_path / "student", "model.layers", tmp_path / "expert", scaling, {})
    expert = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", dtype=torch.float32).state_dict()
    assert expert.keys() == reference.keys()
    assert all(torch.equal(expert[k], v) for k, v in reference.items())  # LoRA's B starts at zero
