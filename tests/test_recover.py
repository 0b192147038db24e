"""Tests for minigpt.recover: the pure maths, config filling, and real Ray Train + DeepSpeed runs on tiny models.

The Ray runs share one embedded Ray (2 CPUs) and train tiny random Llamas (the real SmolLM2 tokenizer beside them)
on a repetitive synthetic corpus, so a few steps are enough for the loss to fall.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from minigpt.config import ConfigError, RecoverConfig, SourceConfig, packaged_deepspeed
from minigpt.recover import check_resources, concurrent_domains, deepspeed_config, recover_all
from minigpt.losses import batch_indices, lr_factor, next_token_loss, stop_early, student_rows, topk_distill_loss
from minigpt.training import build_student, latest_tag
from minigpt.trainset import RecoveryTask, load_blocks

from conftest import make_tiny_llama


ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
VOCAB = 49152  # the real tokenizer's


# ------------------------------------------------------------------------------------------- pure functions


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    f = [lr_factor(s, warmup=3, total=20, min_ratio=0.1) for s in range(20)]
    assert f[0] > 0 and f[0] < f[1] < f[2] < f[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[-1] == pytest.approx(0.1)


def test_batch_indices_partition_each_step_and_are_reproducible():
    n, world, micro, accum = 24, 2, 3, 2
    step_blocks = [batch_indices(n, 1, m, r, world, micro, accum, seed=7) for m in range(accum) for r in range(world)]
    flat = [i for b in step_blocks for i in b]
    assert len(set(flat)) == len(flat) == world * micro * accum  # workers never overlap within a step
    assert batch_indices(n, 1, 0, 1, world, micro, accum, seed=7) == step_blocks[1]
    epoch = [i for s in range(2) for m in range(accum) for r in range(world)
             for i in batch_indices(n, s, m, r, world, micro, accum, seed=7)]
    assert sorted(epoch) == list(range(n))  # one epoch visits every block once
    assert batch_indices(n, 0, 0, 0, world, micro, accum, seed=8) != batch_indices(n, 0, 0, 0, world, micro, accum,
                                                                                    seed=7)


def test_batch_indices_give_a_step_the_same_blocks_whatever_the_world_size():
    """What data-parallel users expect: micro batch x accumulation x workers fixes the blocks of every optimizer
    step, however the product is split (the two-worker ZeRO-3 test relies on it)."""
    n, seed = 20, 3  # 20 blocks, 8 a step: steps 2 and 3 straddle the epoch boundary

    def step_blocks(step: int, micro_batch: int, accum: int, world: int) -> list[int]:
        return sorted(i for m in range(accum) for r in range(world)
                      for i in batch_indices(n, step, m, r, world, micro_batch, accum, seed))

    splits = [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (2, 1, 4), (1, 1, 8)]
    for step in range(5):
        want = step_blocks(step, *splits[0])
        assert len(want) == 8
        assert all(step_blocks(step, *split) == want for split in splits[1:]), step
    assert step_blocks(0, 8, 1, 1) != step_blocks(1, 8, 1, 1)


def _full_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference: KL(softmax(t/T) || softmax(s/T)) per predicted token, over whole distributions."""
    q = torch.softmax(teacher[:, :-1].double() / temperature, -1)
    logp = torch.log_softmax(student[:, :-1].double() / temperature, -1)
    return (q * (q.log() - logp)).sum(-1).mean()


def test_topk_distill_loss_with_the_whole_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 6))
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    top = torch.log_softmax(t / 2.0, -1).topk(10, -1)  # what minigpt.teacher caches at T = 2, with k = V
    got = topk_distill_loss(s, top.indices.int(), top.values, ids, alpha=0.7, temperature=2.0)
    want = 0.7 * 4.0 * _full_kl(s, t, 2.0) + 0.3 * next_token_loss(s, ids).double()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert topk_distill_loss(s, top.indices.int(), top.values, ids, 0.0, 2.0).item() == pytest.approx(
        next_token_loss(s, ids).item())


def test_topk_distill_loss_with_few_tokens_is_the_kl_of_top_k_plus_a_tail_bucket():
    torch.manual_seed(2)
    ids = torch.randint(0, 40, (2, 7))
    s, t = torch.randn(2, 7, 40) * 3, torch.randn(2, 7, 40) * 3
    top = torch.log_softmax(t / 1.5, -1).topk(5, -1)
    got = topk_distill_loss(s, top.indices.int(), top.values, ids, alpha=1.0, temperature=1.5)
    # Reference: both distributions folded to the 5 cached tokens + "everything else".
    q5 = top.values[:, :-1].double().exp()
    p5 = torch.softmax(s[:, :-1].double() / 1.5, -1).gather(-1, top.indices[:, :-1])
    q, p = torch.cat([q5, 1 - q5.sum(-1, True)], -1), torch.cat([p5, 1 - p5.sum(-1, True)], -1)
    want = 1.5**2 * (q * (q.log() - p.log())).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # A student equal to its teacher has nothing to learn, whatever k (renormalising q over k would say otherwise).
    same = torch.log_softmax(s / 1.5, -1).topk(5, -1)
    assert topk_distill_loss(s, same.indices.int(), same.values, ids, 1.0, 1.5).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_distill_loss_on_a_pruned_vocabulary_conditions_on_kept_tokens():
    torch.manual_seed(1)
    ids = torch.randint(0, 6, (1, 5))
    keep = (3, 5, 7, 9, 11, 13)  # student row i = teacher id keep[i]
    teacher = torch.randn(1, 5, 16)
    s = torch.randn(1, 5, 6)
    top = torch.log_softmax(teacher, -1).topk(16, -1)
    rows = student_rows(top.indices.int(), keep)
    assert ((rows >= 0) == torch.isin(top.indices, torch.tensor(keep))).all()
    got = topk_distill_loss(s, rows, top.values, ids, 1.0, 1.0)
    # The teacher conditioned on the student's tokens, against the student.
    assert got.item() == pytest.approx(_full_kl(s, teacher[..., list(keep)], 1.0).item(), rel=1e-5)


def test_stop_early_counts_scores_after_the_best():
    h = [{"valid_bpb": v} for v in (1.0, 0.8, 0.9, 0.85)]
    assert not stop_early(h, 0) and not stop_early(h, 3) and stop_early(h, 2)
    assert not stop_early(h[:2], 1) and not stop_early([], 1)
    assert stop_early([{"valid_bpb": 1.0}, {"valid_bpb": 1.0}], 1)  # a tie is no improvement


def test_recover_budget_in_tokens_or_steps():
    assert RecoverConfig(steps=7).total_steps(256) == 7
    cfg = RecoverConfig(tokens=10_000, batch_size=4, grad_accum=2, workers=2)
    assert cfg.total_steps(256) == 3  # 4096 tokens a step, rounded up
    assert RecoverConfig(batch_size=4).total_steps(256) == 64  # the default budget: 65,536 tokens
    with pytest.raises(ConfigError, match="not both"):
        RecoverConfig(steps=3, tokens=100)
    with pytest.raises(ConfigError, match="patience needs"):
        RecoverConfig(patience=2)
    with pytest.raises(ConfigError, match="general_fraction is 0"):
        RecoverConfig(general_sources=(SourceConfig(kind="text", path="x"),))
    assert RecoverConfig(general_fraction=0.2).general_fraction == 0.2  # without sources: the job's general text


def test_deepspeed_config_fills_recover_settings_and_rejects_conflicts(tmp_path):
    cfg = RecoverConfig(batch_size=3, grad_accum=2, grad_clip=0.5, deepspeed_config="jobs/deepspeed/zero3.json")
    ds = deepspeed_config(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        3, 2, 0.5)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False  # bf16 only on GPU
    assert deepspeed_config(replace(cfg, use_gpu=True))["bf16"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(replace(cfg, deepspeed_config=str(bad)))
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(replace(cfg, deepspeed_config=str(bad)))
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(replace(cfg, deepspeed_config="jobs/deepspeed/nope.json"))
    # zero.Init (partitioned loading) and initialize take numbers only: an "auto" recover does not fill is named.
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"},
                               "gradient_clipping": "auto"}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage3_prefetch_bucket_size set to \"auto\""):
        deepspeed_config(replace(cfg, deepspeed_config=str(bad)))


def test_deepspeed_offload_config_is_packaged_and_checked(tmp_path):
    cfg = RecoverConfig(deepspeed_config=packaged_deepspeed("zero3_offload.json"))
    ds = deepspeed_config(cfg)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # DeepSpeed would refuse recover's client AdamW otherwise
    assert (ROOT / "jobs/deepspeed/zero3_offload.json").resolve() == Path(cfg.deepspeed_config).resolve()
    path = tmp_path / "mine.json"
    # An offloaded optimizer of the user's own file: the same permission is given.
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert deepspeed_config(replace(cfg, deepspeed_config=str(path)))["zero_force_ds_cpu_optimizer"] is False
    for bad, match in (({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs"),
                       ({"stage": 3, "offload_param": {"device": "gpu"}}, "none, cpu or nvme"),
                       ({"stage": 3, "offload_param": {"device": "nvme"}}, "nvme_path"),
                       ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "stage 1-3")):
        path.write_text(json.dumps({"zero_optimization": bad}))
        with pytest.raises(ConfigError, match=match):
            deepspeed_config(replace(cfg, deepspeed_config=str(path)))
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                                "zero_force_ds_cpu_optimizer": True}))
    with pytest.raises(ConfigError, match="zero_force_ds_cpu_optimizer"):
        deepspeed_config(replace(cfg, deepspeed_config=str(path)))


def test_check_resources_names_what_does_not_fit():
    check_resources(RecoverConfig(workers=2, cpus_per_worker=1.0), 2.0, 0.0)
    with pytest.raises(ConfigError, match="3 workers x 1 CPUs = 3 CPUs"):
        check_resources(RecoverConfig(workers=3, cpus_per_worker=1.0), 2.0, 0.0)
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(RecoverConfig(workers=2, use_gpu=True), 8.0, 1.0)
    assert concurrent_domains(5, RecoverConfig(workers=2, cpus_per_worker=0.5), 2.0, 0.0) == 2
    assert concurrent_domains(1, RecoverConfig(workers=2, cpus_per_worker=0.5), 8.0, 0.0) == 1


def test_recover_config_validates_new_fields():
    with pytest.raises(ConfigError, match="lora_targets"):
        RecoverConfig(lora_targets=())
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        RecoverConfig(keep_checkpoints=0)


# ------------------------------------------------------------------------------------------------- fixtures


def _tiny_llama(path: Path, vocab: int, seed: int, tokenizer_dir: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=True,
                                         initializer_range=0.2))  # big enough for LoRA to move logits
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def _shards(folder: Path, n_shards: int = 2, blocks_per_shard: int = 8, period: int = 8, offset: int = 100) -> tuple:
    """A repetitive corpus: every block is the same short cycle of ids at a different phase."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        rows = [[offset + (j + b + s) % period for j in range(BLOCK)] for b in range(blocks_per_shard)]
        table = pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32())),
                          "n_bytes": pa.array([4 * BLOCK] * blocks_per_shard, type=pa.int64())})
        path = folder / f"shard-{s:05d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    return tuple(paths)


def _task(root: Path, domain: str, student: str, shards: tuple, **kw) -> RecoveryTask:
    return RecoveryTask(domain=domain, student_dir=student, train_shards=shards,
                        out_dir=str(root / domain / "recovered"), checkpoint_dir=str(root / domain / "checkpoints"),
                        **kw)


def _assert_plain_checkpoint(out_dir: str, vocab: int) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == vocab
    with safe_open(str(Path(out_dir) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora" in k or "base_model" in k or "base_layer" in k]
    assert AutoTokenizer.from_pretrained(out_dir).eos_token_id is not None
    assert json.loads((Path(out_dir) / "_manifest.json").read_text())["finished"] is True


def _falls(losses: tuple[float, ...]) -> bool:
    return sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2


# The Train controller polls its workers this often (default 2 s); each run starts and ends a poll sooner.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # for conftest's ray_local


@pytest.fixture(scope="module")
def student(tmp_path_factory, smollm2_dir):
    return _tiny_llama(tmp_path_factory.mktemp("student") / "pruned", VOCAB, seed=0, tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _shards(tmp_path_factory.mktemp("data"))


BASE = RecoverConfig(mode="full", steps=6, batch_size=2, workers=2, cpus_per_worker=0.5, lr=1e-2, warmup_steps=1,
                     checkpoint_every=0)


# --------------------------------------------------------------------------------------------- Ray + DeepSpeed


@pytest.mark.slow
def test_full_two_domains_train_concurrently_and_save_plain_experts(ray_local, student, shards, tmp_path):
    other = _shards(tmp_path / "other", period=5, offset=300)
    valid = _shards(tmp_path / "valid", n_shards=1, blocks_per_shard=4)
    tasks = [_task(tmp_path, "legal", student, shards, valid_shards=valid),
             _task(tmp_path, "code", student, other, valid_shards=valid)]
    results = recover_all(tasks, replace(BASE, eval_every=3))
    a, b = results["legal"], results["code"]
    for r in (a, b):
        assert r.ok, r.error
        assert r.steps == 6 and len(r.losses) == 6 and _falls(r.losses) and r.tokens_per_s > 0
        assert r.tokens == 6 * 2 * 2 * BLOCK  # steps x workers x micro batch x block
        _assert_plain_checkpoint(r.out_dir, VOCAB)
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # the two runs overlapped in time
    # Validation before training and every 3 steps; the expert is the best-scoring weights.
    assert [h["step"] for h in a.curve] == [0, 3, 6] and a.curve[-1]["valid_bpb"] < a.curve[0]["valid_bpb"]
    assert a.expert_step == min(a.curve, key=lambda h: h["valid_bpb"])["step"] and not a.stopped_early


def _weights(out_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_zero3_two_workers_match_one_worker(ray_local, student, shards, tmp_path):
    """ZeRO-3 data parallelism changes where the numbers live, not what is computed: one worker accumulating two
    micro batches and two workers of one micro batch each train on the same 4 blocks every step (batch_indices),
    so their losses and final weights agree to float32 rounding. Measured on CPU: identical (one worker sums two
    gradients each scaled by 1/2 in its buffer, two workers average theirs in the reduce-scatter: the same float
    operations), although "two" holds the embedding and its tied head as six blocks of rows (minigpt.vocabsplit)
    and "one" as the stock module. With zero3_offload.json (optimizer state and parameters offloaded to CPU), whose gradient norm and
    optimizer step take DeepSpeed's offload path, the weights differ by 1.2e-7 at most (one rounding at weight
    scale ~1). The tolerance, 1e-5 of the largest weight, is ~100x that; a different batch, or a lost or doubled
    gradient, moves weights by about lr = 1e-2 (training moved them 1.6e-2). The two-worker runs really partition:
    each rank owns half of every parameter (its `ds_tensor`s, recorded in the manifest), and already did when the
    student was loaded, before deepspeed.initialize (`param_elements_loaded`: the whole model on every rank had it
    been loaded whole and partitioned afterwards)."""
    cfg = replace(BASE, steps=3, deepspeed_config=packaged_deepspeed("zero3.json"))
    # "two" also holds the embedding (tied head) as 6 blocks of 8,192 rows (minigpt.vocabsplit), "one" whole.
    runs = {"one": replace(cfg, workers=1, grad_accum=2, vocab_block_params=0),
            "two": replace(cfg, workers=2, grad_accum=1, vocab_block_params=2**18),
            "offload": replace(cfg, workers=2, grad_accum=1,
                               deepspeed_config=packaged_deepspeed("zero3_offload.json"))}
    results = {name: recover_all([_task(tmp_path / name, "legal", student, shards)], c)["legal"]
               for name, c in runs.items()}
    for r in results.values():
        assert r.ok, r.error
        assert r.steps == 3 and r.tokens == 3 * 4 * BLOCK  # the same global batch of 4 blocks a step
    one, two, offload = results["one"], results["two"], results["offload"]
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert offload.losses == pytest.approx(one.losses, rel=1e-5)

    start, w1, w2, w3 = (_weights(d) for d in (student, one.out_dir, two.out_dir, offload.out_dir))
    scale = max(w.abs().max().item() for w in w1.values())
    moved = _max_diff(start, w1)
    assert moved > 1e-3  # training moved the weights far beyond the tolerance below
    assert _max_diff(w1, w2) <= 1e-5 * scale, (_max_diff(w1, w2), scale)
    assert _max_diff(w1, w3) <= 1e-5 * scale, (_max_diff(w1, w3), scale)

    for r, world in ((one, 1), (two, 2), (offload, 2)):
        manifest = json.loads((Path(r.out_dir) / "_manifest.json").read_text())
        assert manifest["world_size"] == world and manifest["zero_stage"] == 3
        assert manifest["vocab_blocks"] == (6 if r is two else 0)
        total, held = manifest["param_elements"], manifest["param_elements_held"]
        assert total == sum(w.numel() for w in start.values()) and len(held) == world
        # Each rank owns 1 / world of every parameter, padded to a multiple of the world size...
        assert all(total / world <= h <= total / world + 64 for h in held), (held, total)
        # ... and never held more: the student was loaded into the partitions (no rank materialised all of it).
        loaded = manifest["param_elements_loaded"]
        assert len(loaded) == world and all(total / world <= n <= total / world + 64 for n in loaded), (loaded, total)
        assert len(manifest["load_peak_rss_mib"]) == world and all(m > 0 for m in manifest["load_peak_rss_mib"])


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights(ray_local, student, shards, tmp_path):
    """A learning rate that wrecks the model: every score after step 0 is worse, so training stops after
    `patience` scores and the expert is the step-0 weights, unchanged."""
    from safetensors.torch import load_file

    valid = _shards(tmp_path / "valid", n_shards=1, blocks_per_shard=4)
    cfg = replace(BASE, lr=5.0, warmup_steps=0, eval_every=1, patience=2)
    r = recover_all([_task(tmp_path, "legal", student, shards, valid_shards=valid)], cfg)["legal"]
    assert r.ok, r.error
    assert r.stopped_early and r.steps == 2 and [h["step"] for h in r.curve] == [0, 1, 2]
    assert r.expert_step == 0 and min(h["valid_bpb"] for h in r.curve[1:]) > r.curve[0]["valid_bpb"]
    before, after = load_file(Path(student) / "model.safetensors"), load_file(Path(r.out_dir) / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="validation split"):
        recover_all([_task(tmp_path, "empty", student, shards)], cfg)


@pytest.mark.slow
def test_lora_merges_and_a_failing_domain_does_not_stop_the_other(ray_local, student, shards, tmp_path):
    """LoRA over ZeRO-3 on two workers: the student is loaded partitioned, the adapters are created afterwards
    whole (deepspeed.initialize partitions them, from rank 0's copy), trained, gathered and merged at save. The
    merged expert differs from the student exactly by a rank <= lora_rank product in each targeted projection and
    not at all elsewhere (embedding, norms: frozen, and loaded and gathered back bit-exactly, the embedding as six
    blocks of rows each filled from and saved into the stock tensor)."""
    from transformers import AutoModelForCausalLM

    bad = _shards(tmp_path / "bad", offset=VOCAB)  # ids past the student's vocabulary
    cfg = replace(BASE, mode="lora", lora_rank=8, lora_alpha=16, lr=2e-2, vocab_block_params=2**18,
                  deepspeed_config=packaged_deepspeed("zero3.json"))
    results = recover_all([_task(tmp_path, "legal", student, shards), _task(tmp_path, "broken", student, bad)], cfg)
    assert not results["broken"].ok and "vocabulary" in results["broken"].error
    good = results["legal"]
    assert good.ok, good.error
    assert _falls(good.losses)
    _assert_plain_checkpoint(good.out_dir, VOCAB)

    before, after = _weights(student), _weights(good.out_dir)
    assert before.keys() == after.keys()
    targeted = {k for k in before if any(f".{t}." in k for t in cfg.lora_targets)}
    assert targeted and all(torch.equal(before[k], after[k]) for k in before.keys() - targeted)
    for k in targeted:  # the adapters were trained and merged into the weights: a low-rank change
        delta = (after[k] - before[k]).double()
        assert delta.abs().max() > 1e-4 and torch.linalg.matrix_rank(delta, rtol=1e-4) <= cfg.lora_rank, k
    assert AutoModelForCausalLM.from_pretrained(good.out_dir).config.vocab_size == VOCAB

    manifest = json.loads((Path(good.out_dir) / "_manifest.json").read_text())
    assert manifest["zero_stage"] == 3 and manifest["world_size"] == 2 and manifest["vocab_blocks"] == 6
    base = sum(w.numel() for w in before.values())
    adapters = manifest["param_elements"] - base  # created whole on every rank, after the partitioned load
    assert 0 < adapters < base / 10
    assert all(base / 2 + adapters <= n <= base / 2 + adapters + 64 for n in manifest["param_elements_loaded"])


def _teacher_targets(teacher_dir: str, task: RecoveryTask, keep: tuple[int, ...], k: int) -> str:
    """What the teacher stage writes: the dense model's top-k on the task's training blocks (teacher ids)."""
    from transformers import AutoModelForCausalLM

    from minigpt import teacher as T
    from minigpt.trainset import training_blocks

    blocks = training_blocks(task)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids, logprobs = T.topk_logprobs(model, torch.tensor(keep)[blocks], k, batch_size=4, temperature=2.0)
    path = Path(task.checkpoint_dir).parent / "targets.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    T.save_targets(path, T.TeacherTargets(T.blocks_digest(blocks), k, 2.0, 1.5, 100, ids, logprobs))
    return str(path)


@pytest.mark.slow
def test_distill_zero3_vocab_pruned_student_resumes_after_a_kill(ray_local, tmp_path, smollm2_dir):
    keep = tuple(range(0, 2048, 4))  # student row i = teacher id 4 * i
    teacher = _tiny_llama(tmp_path / "teacher", VOCAB, seed=1, tokenizer_dir=smollm2_dir)
    small = _tiny_llama(tmp_path / "pruned", len(keep), seed=2, tokenizer_dir=smollm2_dir)
    data = _shards(tmp_path / "data", offset=10)
    valid = _shards(tmp_path / "valid", n_shards=1, blocks_per_shard=4, offset=10)
    cfg = replace(BASE, mode="distill", deepspeed_config="jobs/deepspeed/zero3.json", distill_alpha=0.5,
                  checkpoint_every=2, eval_every=2)
    task = _task(tmp_path, "medical", small, data, valid_shards=valid, teacher_token_ids=keep)
    with pytest.raises(ConfigError, match="targets file"):
        recover_all([task], cfg)
    task = replace(task, teacher_file=_teacher_targets(teacher, task, keep, k=16))

    aborted = recover_all([task], cfg, abort_after_step=3)["medical"]
    assert not aborted.ok and "aborted after step 3" in aborted.error
    assert not Path(task.out_dir).exists()
    assert latest_tag(task) == "step_000002"

    r = recover_all([task], cfg)["medical"]
    assert r.ok, r.error
    assert r.resumed_from == 2 and r.steps == 6 and len(r.losses) == 6  # continued from the checkpoint, not 0
    assert [h["step"] for h in r.curve] == [0, 2, 4, 6]  # the resumed run continued the same curve
    assert r.dense_valid_bpb == 1.5  # the teacher file's reference travels to the result
    assert _falls(r.losses)
    _assert_plain_checkpoint(r.out_dir, len(keep))
    assert not Path(task.checkpoint_dir).exists()  # the expert is final: its checkpoints are gone

    t0 = time.monotonic()
    again = recover_all([task], cfg)["medical"]
    assert again.ok and again.skipped and again.losses == r.losses
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(student, mode):
    """recover.gradient_checkpointing recomputes activations in the backward pass: the loss and every trained
    parameter's gradient are those of the plain model (LoRA's frozen inputs included)."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA's A matrices start alike
        model = build_student(student, RecoverConfig(mode=mode, gradient_checkpointing=checkpointing))
        assert model.is_gradient_checkpointing == checkpointing  # (a PeftModel forwards it to the model)
        loss = next_token_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain), (ck_loss, ck) = grads
    assert ck_loss == pytest.approx(plain_loss, rel=1e-6) and plain.keys() == ck.keys() and plain
    assert all(torch.allclose(plain[n], ck[n], rtol=1e-5, atol=1e-7) for n in plain)


def test_impossible_resource_request_fails_fast(ray_local, student, shards, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="CPUs per domain"):
        recover_all([_task(tmp_path, "legal", student, shards)], replace(BASE, workers=4, cpus_per_worker=1.0))
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "legal").exists()


def test_load_blocks_reads_contract_shards(shards):
    blocks = load_blocks(shards)
    assert blocks.shape == (16, BLOCK) and blocks.dtype == torch.int64
    # The ids _shards wrote, shard by shard and block by block in file order (block b of shard s starts at phase
    # b + s of its 8-id cycle).
    want = [[100 + (j + b + s) % 8 for j in range(BLOCK)] for s in range(2) for b in range(8)]
    assert blocks.tolist() == want


def test_lora_parameters_are_counted_exactly_and_the_recovery_peak_adds_its_terms():
    """minigpt.memory's recovery prediction: LoRA's trainable parameters are what peft creates; ZeRO-3 over two
    workers halves the weights and partitions gradients and optimizer state; checkpointing shrinks activations."""
    from peft import get_peft_model

    from minigpt import memory as MEM
    from minigpt.training import _lora_config

    model = make_tiny_llama()
    cfg = RecoverConfig(mode="lora", lora_rank=4)
    peft_model = get_peft_model(model, _lora_config(cfg))
    created = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert MEM.lora_params(model.config, cfg.lora_targets, 4) == created
    s = MEM.model_sizes(model.config)
    kw = dict(batch=2, seq=16, gradient_checkpointing=False, distill=False, base_bytes=0)
    one = MEM.predict_recovery(s, trainable=s.total_params, zero_stage=2, world=1, **kw)
    three = MEM.predict_recovery(s, trainable=s.total_params, zero_stage=3, world=2, **kw)
    assert three.weights == one.weights // 2 and three.optimizer < one.optimizer and three.gradients < one.gradients
    assert three.gathered > 0 == one.gathered
    gc = MEM.predict_recovery(s, trainable=s.total_params, zero_stage=2, world=1,
                              **{**kw, "gradient_checkpointing": True})
    assert gc.activations < one.activations and gc.peak - one.peak == gc.activations - one.activations
    lora = MEM.predict_recovery(s, trainable=created, zero_stage=2, world=1, **kw)
    assert lora.gradients == 2 * created * 4 and lora.weights == one.weights
    # A large vocabulary under ZeRO-3: gathered whole, the embedding dominates; held as blocks smaller than a
    # layer (minigpt.vocabsplit), a layer does, and the head's blocks add one copy of the logits.
    wide = dataclasses.replace(s, embed_params=100 * s.layer_params, head_params=100 * s.layer_params)
    whole = MEM.predict_recovery(wide, trainable=created, zero_stage=3, world=2, **kw)
    blocks = MEM.predict_recovery(wide, trainable=created, zero_stage=3, world=2, vocab_block=s.layer_params // 2,
                                  **kw)
    assert whole.gathered - blocks.gathered == 2 * 99 * s.layer_params * 4
    assert blocks.logits == whole.logits // 5 * 6
    assert MEM.predict_recovery(wide, trainable=created, zero_stage=2, world=1, vocab_block=8, **kw) == \
        MEM.predict_recovery(wide, trainable=created, zero_stage=2, world=1, **kw)  # ZeRO-2 never splits
