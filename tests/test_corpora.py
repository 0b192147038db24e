"""Tests for minigpt.corpora: every source kind, chunking, hash splits, token blocks, n_bytes and the error paths.

Uses the real SmolLM2 tokenizer from the prepared model folder (local, offline; the smollm2_tokenizer fixture).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.config import ConfigError, DataConfig, DomainConfig, SourceConfig
from minigpt.corpora import (
    DomainData,
    assign_split,
    build_stream,
    doc_hash,
    gather_documents,
    merge_streams,
    prepare_domain,
    read_blocks,
    read_n_bytes,
    retokenize,
    sample_windows,
    token_bytes,
    tokenize_documents,
    weighted_blocks,
)
from minigpt.sources import check_sources, iter_documents, parse_obo_term, split_long

MEDICAL = "patient fever cardiac renal hepatic lesion biopsy dose tumour syndrome".split()
WORDS = ("the court shall grant license any party agreement software clause warranty liability notice copy "
         "source code distribute modify terms conditions section patent holder contributor work derivative").split()


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 70))) + "."
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "other": 1}) + "\n" for d in docs))
    return path


def small_data(**kw) -> DataConfig:
    base = dict(block_size=32, calib_tokens=512, heldout_tokens=256, train_tokens=0, blocks_per_shard=4,
                max_document_chars=2000, salt="test")
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------------------ sources


def test_split_long_cuts_at_paragraphs_then_lines_then_hard():
    para = "word " * 30  # 150 chars
    text = "\n\n".join([para] * 6)
    pieces = split_long(text, 400)
    assert "".join(pieces) == text
    assert all(len(p) <= 400 for p in pieces) and len(pieces) >= 3
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut at blank lines, not mid-paragraph

    lines = "\n".join(["x" * 90] * 10)  # one paragraph, no blank lines
    pieces = split_long(lines, 200)
    assert "".join(pieces) == lines and all(len(p) <= 200 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])

    blob = "y" * 1050  # no breaks at all
    assert split_long(blob, 300) == ["y" * 300] * 3 + ["y" * 150]
    assert split_long("short", 300) == ["short"]


def test_text_sources_file_folder_glob(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha text")
    (d / "sub" / "b.txt").write_text("beta text")
    (d / "sub" / "c.md").write_text("gamma text")
    (d / "blank.txt").write_text("   \n\n  ")
    (d / "bin.dat").write_bytes(b"\x00\x01binary")
    long = "\n\n".join(f"paragraph {i} " + "z" * 150 for i in range(10))
    (d / "long.txt").write_text(long)

    one = list(iter_documents(SourceConfig("text", path=str(d / "a.txt")), 1000))
    assert one == ["alpha text"]
    folder = list(iter_documents(SourceConfig("text", path=str(d)), 1000))
    assert {"alpha text", "beta text", "gamma text"} <= set(folder)
    assert not any("binary" in x or not x.strip() for x in folder)
    assert "".join(x for x in folder if x.startswith("paragraph") or x.startswith("\n")) == long
    assert sum(x.startswith("paragraph") for x in folder) >= 2  # the long file was chunked
    glob_docs = list(iter_documents(SourceConfig("text", path=str(d / "**" / "*.txt")), 1000))
    assert "beta text" in glob_docs and "gamma text" not in glob_docs
    capped = list(iter_documents(SourceConfig("text", path=str(d), max_documents=2), 1000))
    assert len(capped) == 2


def test_jsonl_parquet_and_hf_sources(tmp_path, monkeypatch):
    docs = synthetic_docs(5)
    jl = write_jsonl(tmp_path / "d.jsonl", docs, field="body")
    assert list(iter_documents(SourceConfig("jsonl", path=str(jl), text_field="body"), 4000)) == docs
    with pytest.raises(ConfigError, match="no field 'text'"):
        list(iter_documents(SourceConfig("jsonl", path=str(jl)), 4000))

    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": docs, "n": list(range(5))}), pqf)
    assert list(iter_documents(SourceConfig("parquet", path=str(pqf), text_field="content"), 4000)) == docs

    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    assert list(iter_documents(SourceConfig("hf", path=str(jl), text_field="body"), 4000)) == docs
    assert list(iter_documents(SourceConfig("hf", path=str(pqf), text_field="content", max_documents=2),
                               4000)) == docs[:2]


def test_builtin_sources_yield_documents():
    lic = list(iter_documents(SourceConfig("licenses"), 10**7))
    # GPL -> GPL-3 and friends are symlinks: every text is read once.
    assert len(lic) == len(set(lic)) >= 5
    assert any("GNU GENERAL PUBLIC LICENSE" in t for t in lic)
    code = list(iter_documents(SourceConfig("python-stdlib", max_documents=3), 4000))
    assert len(code) == 3 and all(len(c) <= 4000 for c in code)
    hpo = list(iter_documents(SourceConfig("hpo", max_documents=5), 4000))
    assert len(hpo) == 5
    assert all(": " in h and "[" not in h and not h.endswith('"') for h in hpo)
    check_sources(DomainConfig("b", (SourceConfig("licenses"), SourceConfig("python-stdlib"), SourceConfig("hpo"))))


def test_parse_obo_term():
    term = ['id: HP:1', 'name: Tall stature', 'def: "Height above the \\"norm\\"." [PMID:1, https://x]']
    assert parse_obo_term(term) == 'Tall stature: Height above the "norm".'
    assert parse_obo_term(term + ["is_obsolete: true"]) is None
    assert parse_obo_term(["id: HP:2", "name: All"]) is None  # no definition


# ------------------------------------------------------------------------------------------------- splits


def test_hash_and_split_assignment():
    data = DataConfig(calib_fraction=0.3, heldout_fraction=0.2, valid_fraction=0.1)
    assert doc_hash("abc", "s") == doc_hash("abc", "s") != doc_hash("abc", "t")
    assert len(doc_hash("abc", "s")) == 64
    hashes = [doc_hash(str(i), "s") for i in range(4000)]
    splits = [assign_split(h, data) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in ("calib", "heldout", "valid", "train")}
    assert abs(share["calib"] - 0.3) < 0.04 and abs(share["heldout"] - 0.2) < 0.04
    assert abs(share["valid"] - 0.1) < 0.03
    assert assign_split("0" * 64, data) == "calib" and assign_split("f" * 64, data) == "train"
    # The validation split only takes documents that would train: calib and held-out never move with it.
    without = dataclasses.replace(data, valid_fraction=0.0)
    moved = [(a, assign_split(h, without)) for h, a in zip(hashes, splits) if a != assign_split(h, without)]
    assert moved and all(pair == ("valid", "train") for pair in moved)


def test_token_bytes_exact_for_non_ascii(tokenizer):
    texts = ["naïve café — 日本語のテキスト 🙂🙂 done", "plain ascii", "  leading spaces and trailing \n\n"]
    for text, (ids, nb) in zip(texts, tokenize_documents(tokenizer, texts)):
        assert len(ids) == len(nb) and (nb >= 0).all()
        assert int(nb.sum()) == len(text.encode("utf-8"))
    assert token_bytes("abc", [(0, 1), (1, 3)]).tolist() == [1, 2]
    assert token_bytes("é!", [(0, 1), (0, 1), (1, 2)]).tolist() == [2, 0, 1]
    assert token_bytes(" ab  ", [(1, 2), (2, 3)]).tolist() == [2, 3]  # uncovered spaces still counted


# ------------------------------------------------------------------------------------------------ prepare


def _corpus_domain(tmp_path: Path, n: int = 200) -> tuple[DomainConfig, list[str]]:
    docs = synthetic_docs(n)
    write_jsonl(tmp_path / "corpus.jsonl", docs + docs[:10])  # 10 exact duplicates
    return DomainConfig("synth", (SourceConfig("jsonl", path=str(tmp_path / "corpus.jsonl")),)), docs


def test_prepare_domain_splits_blocks_and_bytes(tmp_path, tokenizer, capsys):
    domain, docs = _corpus_domain(tmp_path)
    data = small_data()
    dd = prepare_domain(domain, data, tokenizer, tmp_path / "data" / "synth")
    assert "[prepare] synth/calib: 16 blocks, 512 tokens" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synth"]  # no temporary folder left

    loaded = DomainData.load(tmp_path / "data" / "synth")
    assert loaded == dd and dd.tokenizer == tokenizer.name_or_path and dd.block_size == 32
    manifest = json.loads((tmp_path / "data" / "synth" / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["salt"] == "test"

    hashes = {s: dd.doc_hashes(s) for s in ("calib", "heldout", "valid", "train")}
    assert all(not (hashes[a] & hashes[b]) for a in hashes for b in hashes if a < b)  # disjoint splits
    assert hashes["valid"]
    assert dd.blocks("calib") == 16 and dd.tokens("calib") == 512 and dd.blocks("heldout") == 8
    # train_tokens=0: every train document except at most the dropped tail.
    n_train = sum(assign_split(doc_hash(d, "test"), data) == "train" for d in set(docs))
    assert n_train - 3 <= len(dd.doc_hashes("train")) <= n_train

    eos = tokenizer.eos_token_id
    by_hash = {h: t for h, t in gather_documents(domain, data)}
    for split in ("calib", "heldout", "valid", "train"):
        used = dd.documents(split)
        assert [h for h, _ in used] == sorted(h for h, _ in used)  # hash order
        # Each entry is a window of the document its hash names, and that document belongs to this split.
        assert all(t in by_hash[h] and assign_split(h, data) == split for h, t in used)
        shards = dd.shards(split)
        assert all(p.is_file() and p.parent.name == split for p in shards)
        assert len(shards) == -(-dd.blocks(split) // data.blocks_per_shard)
        blocks, n_bytes = read_blocks(shards), read_n_bytes(shards)
        assert blocks.shape == (dd.blocks(split), 32) and n_bytes.shape == (dd.blocks(split),)
        assert int(n_bytes.sum()) == dd.n_bytes(split)
        # ASCII text: each block's n_bytes is exactly the bytes of the text it decodes to.
        pieces = []
        for row, nb in zip(blocks.tolist(), n_bytes.tolist()):
            text = tokenizer.decode([t for t in row if t != eos], clean_up_tokenization_spaces=False)
            assert len(text.encode()) == nb
            pieces.append(tokenizer.decode(row, clean_up_tokenization_spaces=False))
        joined = tokenizer.eos_token.join(t for _, t in used)
        covered = "".join(pieces)
        assert joined.startswith(covered) and len(joined) - len(covered) < len(used[-1][1])


def test_prepare_domain_is_deterministic_and_replaces(tmp_path, tokenizer):
    domain, _ = _corpus_domain(tmp_path, n=80)
    data = small_data(train_tokens=320, calib_tokens=300)  # 300 rounds up to 10 blocks
    a = prepare_domain(domain, data, tokenizer, tmp_path / "a")
    out_b = tmp_path / "b"
    out_b.mkdir()
    (out_b / "manifest.json").write_text('{"finished": false}')  # an unfinished leftover is replaced
    b = prepare_domain(domain, data, tokenizer, out_b)
    assert a.tokens("calib") == 320 and a.tokens("train") == 320
    for split in ("calib", "heldout", "train"):
        assert a.documents(split) == b.documents(split)
        assert read_blocks(a.shards(split)).equal(read_blocks(b.shards(split)))
        assert [p.read_bytes() for p in a.shards(split)] == [p.read_bytes() for p in b.shards(split)]
    assert (tmp_path / "a" / "manifest.json").read_text() == (out_b / "manifest.json").read_text().replace(
        str(out_b), str(tmp_path / "a"))


def test_prepare_domain_non_ascii_bytes(tmp_path, tokenizer):
    rng = random.Random(1)
    docs = [f"Entrée {i}: " + " ".join(rng.choice(["café", "日本語", "🙂", "naïve", "straße", "ok"])
                                       for _ in range(rng.randint(10, 40))) for i in range(60)]
    write_jsonl(tmp_path / "u.jsonl", docs)
    domain = DomainConfig("uni", (SourceConfig("jsonl", path=str(tmp_path / "u.jsonl")),))
    dd = prepare_domain(domain, small_data(calib_tokens=64, heldout_tokens=64), tokenizer, tmp_path / "uni")
    for split in ("calib", "heldout", "train"):
        used = [t for _, t in dd.documents(split)]
        total = sum(len(t.encode()) for t in used)
        covered = int(read_n_bytes(dd.shards(split)).sum())
        assert total - len(used[-1].encode()) < covered <= total


# ----------------------------------------------------------------------------------------------- sampling


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=40), st.integers(1, 3000), st.integers(1, 64),
       st.integers(0, 2**32))
def test_sample_windows_spreads_the_budget_over_documents(lengths, target, floor, seed):
    seeds = [seed ^ i for i in range(len(lengths))]
    windows, cap = sample_windows(lengths.__getitem__, len(lengths), target, floor, seeds)
    assert (windows, cap) == sample_windows(lengths.__getitem__, len(lengths), target, floor, seeds)  # seeded
    docs = [i for i, _, _ in windows]
    assert docs == sorted(set(docs))  # document order, one window each
    assert all(0 <= a < b <= lengths[i] and b - a == min(lengths[i], cap) for i, a, b in windows)
    total = sum(b - a for _, a, b in windows) + max(0, len(windows) - 1)  # EOS between windows
    available = sum(lengths) + max(0, sum(n > 0 for n in lengths) - 1)
    if available >= target:
        assert total >= target  # the budget is met ...
        last = windows[-1][2] - windows[-1][1] + (len(windows) > 1)
        assert total - last < target  # ... and no document is taken beyond it
    else:
        assert total == available  # a short split is taken whole
    first = max(floor, -(-target // len(lengths)))
    if cap > first:  # the cap only grows when half of it could not fill the budget from every document
        half = cap // 2
        assert sum(min(n, half) for n in lengths) + sum(n > 0 for n in lengths) - 1 < target
    # Spread: with every document long enough, the budget takes as many documents as the cap forces.
    if all(n >= cap for n in lengths) and available >= target:
        assert len(windows) == min(len(lengths), -(-(target + 1) // (cap + 1)))


def _long_docs_domain(tmp_path: Path, n: int = 120) -> DomainConfig:
    rng = random.Random(3)
    docs = [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(300)) + "." for i in range(n)]
    write_jsonl(tmp_path / "long.jsonl", docs)
    return DomainConfig("long", (SourceConfig("jsonl", path=str(tmp_path / "long.jsonl")),))


def test_prepared_samples_span_documents_and_follow_the_seed(tmp_path, tokenizer):
    domain = _long_docs_domain(tmp_path)
    data = small_data(calib_tokens=512, heldout_tokens=256, train_tokens=640)
    dd = prepare_domain(domain, data, tokenizer, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]
    for split, budget in (("calib", 512), ("heldout", 256), ("train", 640)):
        m = manifest[split]
        # ~300-token documents: taking them whole would fill the budget from 2 or 3; windows of at most half a
        # block (16 tokens) spread it over budget / 17 documents.
        assert m["window_tokens"] == 16 and m["documents"] == len(dd.doc_hashes(split)) >= budget // 17
        assert m["available"] == sum(assign_split(h, data) == split for h, _ in gather_documents(domain, data))
        assert dd.tokens(split) == budget
    other = prepare_domain(domain, dataclasses.replace(data, seed=1), tokenizer, tmp_path / "b")
    assert [h for h, _ in other.documents("calib")] == [h for h, _ in dd.documents("calib")]  # same documents
    assert [t for _, t in other.documents("calib")] != [t for _, t in dd.documents("calib")]  # other windows


def test_retokenize_writes_the_windows_as_shards(tmp_path, tokenizer):
    domain, _ = _corpus_domain(tmp_path, n=80)
    dd = prepare_domain(domain, small_data(), tokenizer, tmp_path / "data")
    out = tmp_path / "expert" / "train"
    out.mkdir(parents=True)
    (out / "stale.parquet").write_text("left by an earlier run")
    paths = retokenize(dd.documents("train"), tokenizer, 32, 3, out)
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{k:05d}.parquet" for k in range(len(paths))]
    assert [p.name for p in paths] == sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in (tmp_path / "expert").iterdir()) == ["train"]  # no temporary folder left
    assert [pq.read_metadata(p).num_rows for p in paths][:-1] == [3] * (len(paths) - 1)
    # The same tokenizer re-tokenizes the train split's documents into exactly its blocks and byte counts.
    assert read_blocks(paths).equal(read_blocks(dd.shards("train")))
    assert read_n_bytes(paths).equal(read_n_bytes(dd.shards("train")))
    # Another tokenizer (here: one character per token, without offsets) gives other ids for the same text.
    split_tok = _CharTokenizer(tokenizer)
    other = read_blocks(retokenize(dd.documents("train"), split_tok, 32, 3, tmp_path / "other"))
    text = tokenizer.eos_token.join(t for _, t in dd.documents("train"))
    assert split_tok.decode(other.flatten().tolist()) == text[:len(split_tok.decode(other.flatten().tolist()))]
    assert other.numel() > read_blocks(paths).numel()


class _CharTokenizer:
    """A slow (offset-less) tokenizer over the real one's vocabulary that encodes each character alone."""

    is_fast = False

    def __init__(self, base):
        self.base, self.eos_token_id, self.name_or_path = base, base.eos_token_id, "chars"

    def __call__(self, texts, **kw):
        return {"input_ids": [[i for c in t for i in self.base(c, add_special_tokens=False)["input_ids"]]
                              for t in texts]}

    def decode(self, ids):
        return self.base.decode(ids, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------- errors


# ------------------------------------------------------------------------------------- weighted sources


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.lists(st.floats(0.01, 100.0), min_size=1, max_size=6))
def test_weighted_blocks_share_out_exactly(n, weights):
    shares = weighted_blocks(n, weights)
    assert sum(shares) == n and all(s >= 0 for s in shares)
    assert all(abs(s - n * w / sum(weights)) < 1 for s, w in zip(shares, weights))  # within one block of exact


def _two_source_domain(tmp_path: Path, weights: tuple[float, float]) -> DomainConfig:
    """`legal`: 200 documents of legal words; `med`: 60 of medical words (a word of one never occurs in the other)."""
    rng = random.Random(3)
    write_jsonl(tmp_path / "legal.jsonl", synthetic_docs(200))
    write_jsonl(tmp_path / "med.jsonl", [f"Case {i}. " + " ".join(rng.choice(MEDICAL) for _ in range(50)) + "."
                                         for i in range(60)])
    return DomainConfig("mixed", (SourceConfig("jsonl", path=str(tmp_path / "legal.jsonl"), weight=weights[0]),
                                  SourceConfig("jsonl", path=str(tmp_path / "med.jsonl"), weight=weights[1])))


def _medical_blocks(dd: DomainData, split: str, tokenizer) -> list[bool]:
    rows = read_blocks(dd.shards(split)).tolist()
    return [any(w in tokenizer.decode(r).split() for w in MEDICAL) for r in rows]


def test_weighted_sources_share_every_split(tmp_path, tokenizer, capsys):
    """With weights 1 : 3 each required split holds a quarter / three quarters of its blocks from the two sources
    (pooled, the larger source's 200 documents would dominate the smaller's 60), interleaved so that any leading
    share of the blocks holds both."""
    data = small_data()  # calib 16 blocks, held-out 8
    dd = prepare_domain(_two_source_domain(tmp_path, (1.0, 3.0)), data, tokenizer, tmp_path / "weighted")
    assert "[prepare] mixed/calib: 16 blocks, 512 tokens" in capsys.readouterr().out
    for split, n in (("calib", 16), ("heldout", 8)):
        med = _medical_blocks(dd, split, tokenizer)
        assert len(med) == n and sum(med) == n * 3 // 4
        assert 0 < sum(med[: n // 2]) < n // 2  # the first half already holds both sources
        shares = json.loads((tmp_path / "weighted" / "manifest.json").read_text())["splits"][split]["sources"]
        assert [(s["weight"], s["blocks"]) for s in shares] == [(1.0, n // 4), (3.0, n * 3 // 4)]
        assert [h for h, _ in dd.documents(split)] == sorted(h for h, _ in dd.documents(split))
    # The same documents fall in each split either way: weights choose windows, never a document's split.
    for split in ("calib", "heldout", "valid", "train"):
        assert {assign_split(h, data) for h in dd.doc_hashes(split)} <= {split}


def test_merge_streams_keeps_every_block_once(tokenizer):
    docs = [(doc_hash(t, "x"), t) for t in synthetic_docs(40)]
    parts = [build_stream(docs[:20], tokenizer, 32, 32 * 3), build_stream(docs[20:], tokenizer, 32, 32 * 6)]
    merged = merge_streams(parts, 32)

    def rows(stream):  # (token ids, bytes) of each block
        return list(zip(map(tuple, stream.ids.reshape(-1, 32).tolist()), stream.n_bytes.reshape(-1, 32).sum(1).tolist()))

    first = rows(parts[0])
    assert sorted(rows(merged)) == sorted(first + rows(parts[1]))
    assert [0 if r in first else 1 for r in rows(merged)] == [1, 0, 1, 1, 0, 1, 1, 0, 1]  # keys (j + 1/2) / n
    assert [r for r in rows(merged) if r in first] == first  # each source's blocks keep their order
    assert merged.documents == sorted(parts[0].documents + parts[1].documents)


def test_weighted_source_short_of_its_share_is_an_error(tmp_path, tokenizer):
    domain = _two_source_domain(tmp_path, (1.0, 99.0))  # the medical source cannot give 99% of 4,096 tokens
    out = tmp_path / "data" / "mixed"
    with pytest.raises(ConfigError, match=r"^domain 'mixed': source med has [\d,]+ tokens of calibration text, its "
                                          r"weight's share is 4,064 of the 4,096 asked \(data.calib_tokens\)$"):
        prepare_domain(domain, small_data(calib_tokens=4096), tokenizer, out)
    assert list((tmp_path / "data").iterdir()) == []


def test_check_sources_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (SourceConfig("text", path=str(tmp_path / "missing.txt")), "does not exist"),
        (SourceConfig("jsonl", path=str(tmp_path / "*.jsonl")), "matches no file"),
        (SourceConfig("text", path=str(tmp_path / "empty")), "empty folder"),
        (SourceConfig("hf", path=str(tmp_path / "nope.parquet")), "does not exist"),
        (SourceConfig("hf", path="someone/not-cached-dataset-xyz"), "not in the local Hugging Face cache"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigError, match=f"^domain 'legal': .*{message}") as e:
            check_sources(DomainConfig("legal", (SourceConfig("licenses"), source)))
        assert "\n" not in str(e.value)
    (tmp_path / "ok.txt").write_text("x")
    check_sources(DomainConfig("ok", (SourceConfig("text", path=str(tmp_path / "*.txt")),)))


def test_prepare_domain_errors_leave_nothing(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    out = tmp_path / "data" / "empty"
    with pytest.raises(ConfigError, match="^domain 'empty': its sources yield no documents$"):
        prepare_domain(DomainConfig("empty", (SourceConfig("text", path=str(tmp_path / "blank.txt")),)),
                       small_data(), tokenizer, out)
    assert not out.exists()

    domain, _ = _corpus_domain(tmp_path, n=40)
    out = tmp_path / "data" / "synth"
    with pytest.raises(ConfigError, match=r"^domain 'synth': calibration split has [\d,]+ tokens, the job asks for "
                                          r"100,000 \(data.calib_tokens\)$"):
        prepare_domain(domain, small_data(calib_tokens=100_000), tokenizer, out)
    with pytest.raises(ConfigError, match=r"^domain 'synth': held-out split has .*\(data.heldout_tokens\)$"):
        prepare_domain(domain, small_data(heldout_tokens=100_000), tokenizer, out)
    assert list((tmp_path / "data").iterdir()) == []  # neither out_dir nor a temporary folder
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        DomainData.load(out)
