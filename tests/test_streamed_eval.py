"""Evaluation and the teacher, layer-streamed (issue 28): per-block NLL, top-k targets and greedy samples of a model
read one decoder layer at a time (minigpt.evalpass.Streamed) equal the model in memory, with the residual stream
spilled past a tiny budget and one batch's logits at a time; the evaluate stage's figures (a vocabulary-pruned expert
included) and the teacher task's targets do not depend on calibrate.streamed. Tiny random models built in-process."""

import pytest
import torch

from minigpt import evaluate as E
from minigpt import slim
from minigpt import stats as S
from minigpt import teacher as T
from minigpt.config import EvaluateConfig, PruneConfig
from minigpt.evalpass import InMemory, Streamed, nll_sum, open_forward
from minigpt.hidden import HiddenBuffer
from minigpt.losses import token_nll
from minigpt.metrics import add_intervals
from minigpt.plan import build_plan
from tests.conftest import TEXT, make_tiny_pair
from tests.test_metrics import docs
from tests.test_streaming import make, saved

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(0, 96, (7, 20), generator=torch.Generator().manual_seed(7))
BATCH = 2  # four batches, the last one short
ONE_BATCH = BATCH * 20 * 32 * 4  # bytes of one batch's residual stream (hidden 32, float32)


@pytest.fixture
def spills(monkeypatch) -> list[int]:
    """Keys HiddenBuffer wrote to its spill files during the test."""
    seen: list[int] = []
    real = HiddenBuffer._spill

    def spy(self, key, value):
        seen.append(key)
        return real(self, key, value)

    monkeypatch.setattr(HiddenBuffer, "_spill", spy)
    return seen


def per_block_nll(fwd, blocks: torch.Tensor, batch: int) -> torch.Tensor:
    """Summed next-token NLL of each block (float64), from the forward's batches."""
    out = []
    for lo, logits in fwd.batches(blocks, batch):
        x = blocks[lo:lo + len(logits)]
        out.append(token_nll(logits, x).view(len(x), -1).double().sum(1))
    return torch.cat(out)


def topk(fwd, blocks: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and float32 log-probabilities (what targets.topk_logprobs stores in float16)."""
    ids, vals = [], []
    for _, logits in fwd.batches(blocks, BATCH):
        top = torch.log_softmax(logits.float() / temperature, -1).topk(k, -1)
        ids.append(top.indices)
        vals.append(top.values)
    return torch.cat(ids), torch.cat(vals)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_streamed_nll_and_topk_equal_in_memory(arch, tmp_path, spills):
    model = make(arch)
    mem = InMemory(model)
    st = open_forward(saved(model, tmp_path / arch), streamed=True, hidden_budget=ONE_BATCH)
    assert isinstance(st, Streamed)

    got, ref = per_block_nll(st, BLOCKS, BATCH), per_block_nll(mem, BLOCKS, BATCH)
    assert spills and 0 not in spills  # batch 0 stayed in memory, the others went to files
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    total, tokens = nll_sum(st, BLOCKS, BATCH)
    assert tokens == 7 * 19 and total == pytest.approx(float(ref.sum()), rel=1e-5)

    ids, vals = topk(st, BLOCKS, 5, 2.0)
    ref_ids, ref_vals = topk(mem, BLOCKS, 5, 2.0)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=1e-5)
    # What the teacher stores: the same ids, float16 log-probabilities equal to a rounding step.
    s_ids, s_lp = T.topk_logprobs(st, BLOCKS, 5, BATCH, temperature=2.0)
    m_ids, m_lp = T.topk_logprobs(model, BLOCKS, 5, BATCH, temperature=2.0)
    assert torch.equal(s_ids, m_ids) and (s_lp.float() - m_lp.float()).abs().max() <= 2e-3


def test_streamed_logits_come_one_batch_at_a_time(tmp_path):
    st = open_forward(saved(make("llama"), tmp_path / "m"), streamed=True, hidden_budget=0)
    heads = []
    finish = st.dec.finish
    st.dec.finish = lambda ids, hidden: heads.append(len(ids)) or finish(ids, hidden)
    parts = st.batches(BLOCKS, BATCH)
    lo, logits = next(parts)
    assert lo == 0 and logits.shape == (BATCH, 20, 96) and heads == [BATCH]  # the head has run on one batch only
    assert [lo for lo, _ in parts] == [2, 4, 6] and heads == [2, 2, 2, 1]


def test_streamed_greedy_samples_equal_generate(tmp_path):
    model = make("llama", seed=3)
    st = open_forward(saved(model, tmp_path / "m"), streamed=True, hidden_budget=0)
    prompts = [BLOCKS[0:1, :9], BLOCKS[1:2, :4], BLOCKS[2:3, :12]]  # different lengths, one streamed pass per token
    got = st.greedy(prompts, 6, eos=2)
    ref = InMemory(model).greedy(prompts, 6, eos=2)
    assert [g.tolist() for g in got] == [r.tolist() for r in ref] and all(g.shape[1] for g in got)


def test_teacher_task_streamed_equals_in_memory(tmp_path):
    folder = str(saved(make("qwen2", seed=1), tmp_path / "dense"))
    task = T._teacher_task._function  # the Ray task's body, run here
    blocks = BLOCKS.numpy().astype("int32")
    whole = task(folder, "float32", False, blocks, 4, BATCH, 1, False, 1.5)
    streamed = task(folder, "float32", False, blocks, 4, BATCH, 1, False, 1.5, streamed=True, hidden_budget=0)
    assert (whole[0] == streamed[0]).all() and abs(whole[1].astype("float32") - streamed[1]).max() <= 2e-3
    nll, n = task(folder, "float32", False, blocks, 0, BATCH, 1, True)
    s_nll, s_n = task(folder, "float32", False, blocks, 0, BATCH, 1, True, streamed=True, hidden_budget=0)
    assert n == s_n == 7 * 19 and s_nll == pytest.approx(nll, rel=1e-6)


def _vocab_expert(model, tok, folder):
    """A vocabulary-pruned, MLP-pruned expert of `model` saved to `folder` (tokenizer rewritten, ids remapped)."""
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog. " * 2)])
    plan = build_plan(S.accumulate(model, ids, batch_size=1), model,
                      PruneConfig(method="contextual", target=0.2, vocab=True, reconstruct=False), domain="d",
                      tokenizer=tok)
    assert plan.vocab_keep is not None and len(plan.vocab_keep) < len(tok)
    small, small_tok = slim.slim_expert(model, tok, plan)
    return str(slim.save_expert(small, small_tok, folder))


def test_evaluate_figures_do_not_depend_on_streaming(tmp_path, spills):
    model, tok = make_tiny_pair()
    dense = tmp_path / "dense"
    slim.save_expert(model, tok, dense)
    models = {"dense": str(dense), "d/pruned": _vocab_expert(model, tok, tmp_path / "expert")}
    texts = {"d": docs(6, seed=1) + [TEXT], "e": docs(5, seed=2)}
    cfg = EvaluateConfig(batch_size=3, sample_tokens=5, sample_prompt_chars=30, bootstrap_samples=200)
    out = {}
    for streamed in (False, True):
        res = {label: E._evaluate_model(label, folder, texts, cfg, 24, None, docs(3, seed=9), None,
                                        streamed=streamed, hidden_budget=3 * 24 * 32 * 4)
               for label, folder in models.items()}
        add_intervals(res, "dense", list(texts), cfg.bootstrap_samples, cfg.confidence)
        out[streamed] = res
    assert spills  # the streamed run spilled past its budget of one batch
    for label in models:
        whole, streamed = out[False][label], out[True][label]
        assert whole["size"] == streamed["size"] and whole["samples"] == streamed["samples"]
        cells = [(whole["domains"][d], streamed["domains"][d]) for d in texts] + [(whole["general"],
                                                                                  streamed["general"])]
        for a, b in cells:
            assert a["blocks"] > 1 and (a["tokens"], a["bytes"], a["blocks"]) == (b["tokens"], b["bytes"], b["blocks"])
            for key in ("loss", "ppl", "bits_per_byte", "ppl_ratio", "bits_per_byte_ratio"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
            for key in ("ppl_ci", "bits_per_byte_ci", "ppl_ratio_ci", "bits_per_byte_ratio_ci"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
            assert b["documents"]["nll"] == pytest.approx(a["documents"]["nll"], rel=1e-5)
    # The expert really is vocabulary-pruned: it tokenizes the same text into other ids than the dense model.
    assert out[True]["d/pruned"]["size"]["vocab_size"] < out[True]["dense"]["size"]["vocab_size"]
