"""Shared fixtures: tiny random models built in-process, and Ray settings for tests."""

import os

import pytest
import torch

# Tests never reach a model hub, and Ray's auth mode is set explicitly (see minigpt/raylib.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MINIGPT_DASHBOARD", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 32, inter: int = 64, layers: int = 3,
                    heads: int = 4, kv_heads: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-zero activations; larger weights make channels differ, which the tests need.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
