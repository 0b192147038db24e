"""Tests for out-of-source evaluation text (domains.*.eval_sources): config, preparation, overlap removal, leakage,
intervals, summary and report."""

import json
from pathlib import Path

import numpy as np
import pytest

from minigpt.config import ConfigError, DataConfig, DomainConfig, SourceConfig
from minigpt.jobfile import parse
from minigpt.corpora import doc_hash, prepare_domain
from minigpt.evaltext import (EvalSets, LeakageError, banned_hashes, check_leakage, clean, ngram_hashes,
                              prepare_eval_sets, shared_fraction)
from tests.conftest import make_tiny_tokenizer

WORDS = "the court shall grant the licensee a perpetual right to copy and modify the work each year".split()
OTHER = "patient presents with fever cough and abnormal heart rhythm after the long procedure today".split()


def _docs(folder: Path, words: list[str], n: int, seed: int, prefix: str) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        text = f"{prefix} {i}. " + " ".join(rng.choice(words, size=40))
        (folder / f"{prefix}{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def test_labels_and_config_errors(tmp_path):
    assert SourceConfig(kind="hpo").label == "hpo"
    assert SourceConfig(kind="text", path="data/clinical-notes/*.txt").label == "clinical-notes"
    assert SourceConfig(kind="jsonl", path="x/cases.v2.jsonl").label == "cases"
    assert SourceConfig(kind="text", path="a", name="mine").label == "mine"
    with pytest.raises(ConfigError, match="source name"):
        SourceConfig(kind="text", path="a", name="no spaces")
    with pytest.raises(ConfigError, match="named b more than once"):
        DomainConfig("d", (SourceConfig(kind="hpo"),), (SourceConfig(kind="text", path="a/b"),
                                                        SourceConfig(kind="text", path="c/b")))
    with pytest.raises(ConfigError, match="eval source hpo is also one of its sources"):
        DomainConfig("d", (SourceConfig(kind="hpo"),), (SourceConfig(kind="hpo"),))
    job = parse({"name": "j", "model": "m", "domains": {"legal": {
        "sources": [{"kind": "licenses"}], "eval_sources": [{"kind": "text", "path": "x", "name": "statutes"}]}}})
    assert job.domain("legal").eval_sources[0].label == "statutes"
    assert job.domain("legal").without_eval().eval_sources == ()


def test_missing_eval_source_is_one_line_before_work(tmp_path):
    from minigpt.sources import check_sources

    dom = DomainConfig("legal", (SourceConfig(kind="licenses"),),
                       (SourceConfig(kind="text", path=str(tmp_path / "nowhere" / "*.txt"), name="statutes"),))
    with pytest.raises(ConfigError, match=r"^domain 'legal': eval source 'statutes': source path .* matches no "
                                          r"file$"):
        check_sources(dom)


def test_shared_fraction_equals_isin():
    """The binary search gives np.isin's fraction on random hash sets (edges included: below, above, empty)."""
    rng = np.random.default_rng(0)
    for n_own, n_doc in ((0, 5), (1, 3), (50, 1), (1000, 200), (3, 40)):
        own = np.unique(rng.integers(-50, 50, n_own))
        grams = np.unique(rng.integers(-60, 60, n_doc))
        assert shared_fraction(grams, own) == pytest.approx(np.isin(grams, own).mean() if n_own else 0.0)


def test_ngram_overlap_and_exact_copies_are_dropped():
    own = ["one two three four five six seven eight nine ten eleven twelve"]
    grams = np.unique(np.concatenate([ngram_hashes(t) for t in own]))
    assert len(ngram_hashes(own[0])) == 5 and len(ngram_hashes("too short to have one")) == 0
    docs = [("h-own", "anything"),  # the same hash as a domain document
            ("h1", "One two three four five six seven eight nine ten, and more words after it here"),  # 3 of 8
            ("h2", "completely different words that share nothing with the domain text at all today")]
    kept, exact, near = clean(docs, {"h-own"}, grams, 0.2)
    assert (exact, near) == (1, 1) and [h for h, _ in kept] == ["h2"]
    kept, _, near = clean(docs, {"h-own"}, grams, 0.5)  # 3/8 shared stays under a 50% threshold
    assert near == 0 and [h for h, _ in kept] == ["h1", "h2"]


def test_prepare_eval_sets_and_leakage(tmp_path):
    tok = make_tiny_tokenizer()
    own = _docs(tmp_path / "own", WORDS, 40, 0, "licence")
    other = _docs(tmp_path / "other", OTHER, 12, 1, "case")
    (tmp_path / "other" / "copied.txt").write_text(own[3])  # a domain document copied into the eval source
    data = DataConfig(block_size=16, calib_tokens=64, heldout_tokens=32, eval_tokens=128, calib_fraction=0.4,
                      heldout_fraction=0.2)
    dom = DomainConfig("legal", (SourceConfig(kind="text", path=str(tmp_path / "own")),),
                       (SourceConfig(kind="text", path=str(tmp_path / "other"), name="cases"),))
    prepared = prepare_domain(dom.without_eval(), data, tok, tmp_path / "data")
    sets = prepare_eval_sets(dom, data, tok, tmp_path / "evaltext")
    info = sets.sets["cases"]
    assert info["read"] == 13 and info["dropped_exact"] == 1 and info["available"] == 12
    texts = EvalSets.load(tmp_path / "evaltext").texts()["cases"]
    assert texts and all(any(t in o for o in other) for t in texts)  # windows of the other source's documents
    assert 0 < info["tokens"] <= 128
    check_leakage(prepared, sets)  # nothing shared

    # An eval document that is also in the validation split (here: forced by writing the same hash) is leakage.
    hashes = {h for h, _ in sets.documents("cases")}
    import pyarrow as pa
    import pyarrow.parquet as pq

    valid = tmp_path / "data" / "valid" / "documents.parquet"
    table = pq.read_table(valid)
    extra = pa.table({"doc_hash": [sorted(hashes)[0]], "text": ["x"], "start": [0], "end": [1]})
    pq.write_table(pa.concat_tables([table, extra.cast(table.schema)]), valid)
    with pytest.raises(LeakageError, match=r"'legal': 1 eval source 'cases' document\(s\) also in the valid"):
        check_leakage(prepared, sets)

    # Banned from general replay: every eval document's hash.
    assert {doc_hash(t, data.salt) for t in other} <= banned_hashes([dom], data)

    # An eval source that is all the domain's own text leaves nothing: one line, nothing written.
    dup = DomainConfig("legal", dom.sources, (SourceConfig(kind="text", path=str(tmp_path / "own" / "*.txt"),
                                                           name="same"),))
    with pytest.raises(ConfigError, match=r"eval source 'same' has no document left \(40 read, 40 equal"):
        prepare_eval_sets(dup, data, tok, tmp_path / "evaltext2")
    assert not (tmp_path / "evaltext2").exists()


def _oos_cell(nll: list[float], tokens: list[int]) -> dict:
    """A cell as lm_metrics returns it, from per-document sums."""
    loss = sum(nll) / sum(tokens)
    return {"loss": loss, "ppl": float(np.exp(loss)), "bits_per_byte": sum(nll) / (4 * sum(tokens) * np.log(2)),
            "tokens": sum(tokens), "documents": {"nll": nll, "tokens": tokens, "bytes": [4 * t for t in tokens]}}


def test_oos_intervals_summary_and_report(tmp_path):
    """Paired intervals on out-of-source cells; the report's headline leads with the worst out-of-source text."""
    from minigpt.metrics import add_intervals
    from minigpt.report import console_table, worst_oos, write_report
    from tests.test_report import eval_data

    data = eval_data()
    models = data["models"]
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(50, 90, 12)]
    base = [float(x) * t for x, t in zip(rng.uniform(2.0, 2.5, 12), tokens)]
    models["dense"]["oos"] = {d: {"cases": _oos_cell(base, tokens), "notes": _oos_cell(base, tokens)}
                              for d in ("legal", "medical", "code")}
    for d in ("legal", "medical", "code"):
        for kind, scale in (("pruned", 1.10), ("recovered", 1.05)):
            models[f"{d}/{kind}"]["oos"] = {d: {"cases": _oos_cell([b * scale for b in base], tokens),
                                                "notes": _oos_cell([b * scale * 1.02 for b in base], tokens)}}
    add_intervals(models, "dense", [], samples=200, confidence=0.9)
    cell = models["legal/recovered"]["oos"]["legal"]["notes"]
    lo, hi = cell["ppl_ratio_ci"]
    assert lo <= cell["ppl_ratio"] <= hi and cell["ppl_ratio"] > models["legal/recovered"]["oos"]["legal"][
        "cases"]["ppl_ratio"]
    assert models["dense"]["oos"]["legal"]["cases"]["ppl_ratio_ci"] == [1.0, 1.0]
    worst = worst_oos(data, "legal/recovered", "legal")
    assert worst[0] == "notes" and worst[1] == pytest.approx(cell["ppl_ratio"])

    md, _ = write_report(tmp_path, data)
    head = md.read_text().split("## Quality per domain")[0]
    assert "out-of-source ppl ÷ dense, worst text" in head and "Only text from each" not in head
    assert f"on legal text from other sources {worst[1]:.2f}× dense" in head and "(notes, of 2 text(s))" in head
    assert "Domain: legal, text of other sources" in md.read_text()
    legal = next(line for line in console_table(data).splitlines() if line.startswith("legal"))
    assert legal.rstrip().endswith("(notes)")
