"""Saving recovery's weights one layer at a time (minigpt.trainsave): the expert it writes is the one peft's
merge_and_unload + save_pretrained would give, and no piece is bigger than one layer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from minigpt import trainsave as TS


def _student(folder, tie: bool):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab=len(tok), tie=tie)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_layer_groups_split_by_layer_and_module_whatever_the_prefix():
    names = ["base_model.model.model.layers.10.mlp.up_proj.weight", "base_model.model.model.embed_tokens.weight",
             "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
             "base_model.model.model.layers.2.input_layernorm.weight", "base_model.model.lm_head.weight"]
    groups = TS.layer_groups(names, "model.layers")
    assert groups == [names[2:4], names[:1], [names[1]], [names[4]]]


@pytest.mark.parametrize("lora,tie", [(True, True), (False, False)])
def test_expert_written_layer_by_layer_equals_the_merged_model(tmp_path, lora, tie):
    from peft import LoraConfig, get_peft_model

    student = _student(tmp_path / "student", tie)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    scaling = None
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        torch.manual_seed(1)
        with torch.no_grad():  # B starts at zero: make the adapters change something
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        scaling = 8 / 4
    TS.write_engine_weights(model, "model.layers", stage=0, rank=0, out_dir=tmp_path / "weights")
    TS.write_expert(tmp_path / "weights", student, "model.layers", tmp_path / "expert", scaling,
                    {"_manifest.json": {"finished": True}})

    reference = (model.merge_and_unload() if lora else model).state_dict()
    expert = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", dtype=torch.float32)
    got = expert.state_dict()
    assert set(got) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
    if lora:  # the merge changed the targeted weights (and only those)
        base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
        changed = {k for k in base if not torch.equal(base[k], got[k])}
        assert changed and all("q_proj" in k or "down_proj" in k for k in changed)
    assert json.loads((tmp_path / "expert" / "_manifest.json").read_text()) == {"finished": True}
    assert (tmp_path / "expert" / "tokenizer.json").is_file()


def test_a_lora_tensor_without_its_pair_is_refused():
    state = {"m.q_proj.base_layer.weight": torch.zeros(2, 2), "m.q_proj.lora_A.default.weight": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="incomplete LoRA pair"):
        TS.merge_lora(state, 2.0)
