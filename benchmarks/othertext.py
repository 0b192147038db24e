"""The out-of-source suite: text of each demo domain from other sources, and other forms, than the job reads.

The demo calibrates and trains on /usr/share/common-licenses (legal), HPO's one-line phenotype definitions
(medical) and the Python standard library (code). The suite (minigpt/packaged.py, every text from a pinned PyPI
package) holds, per domain, one text of the calibration source's form from another source and two or three of
other forms:
  legal    spdx (other licences), mmlu-law (bar-exam vignettes with answers), constitution-india (statute)
  medical  mondo (disease definitions), mmlu-medical (clinical vignettes), pmc-articles (research articles),
           pubmed-abstracts (research abstracts)
  code     pypi-code (click, attrs, jinja2), sympy (symbolic maths with doctests), pyarrow-tests (pytest suites)
They were chosen before any method was tuned on them. Each text is read through minigpt's own source readers
(documents of at most DOC_CHARS characters), cleaned the way a job cleans its eval_sources (minigpt.evaltext: a
document sharing >= 20% of its word 8-grams with the calibration source's text is dropped) and sampled evenly
across its documents, so a benchmark scoring the first blocks still sees the whole text.

Usage: .venv/bin/python benchmarks/othertext.py   (prints what each domain's texts give)
"""

from __future__ import annotations

import numpy as np

from minigpt import evaltext, packaged
from minigpt.config import DataConfig, DomainConfig, SourceConfig
from minigpt.corpora import gather_documents
from minigpt.sources import iter_documents

DOMAINS = {"legal": "licenses", "medical": "hpo", "code": "python-stdlib"}  # domain -> its calibration source
DOC_CHARS = 4000
SAMPLE_DOCS = 40  # documents taken per text, evenly spaced over it


def _own_grams(domain: str) -> np.ndarray:
    docs = gather_documents(DomainConfig(domain, (SourceConfig(kind=DOMAINS[domain]),)), DataConfig())
    return np.unique(np.concatenate([evaltext.ngram_hashes(t) for _, t in docs]))


def suite(domain: str, docs: int = SAMPLE_DOCS) -> dict[str, list[str]]:
    """kind -> `docs` documents of each out-of-source text of `domain`, spread evenly over the text."""
    if domain not in DOMAINS:
        raise ValueError(f"othertext: unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    packaged.fetch_wheels()
    grams = _own_grams(domain)
    out = {}
    for kind in packaged.DOMAINS[domain]:
        texts = [(str(i), t) for i, t in enumerate(iter_documents(SourceConfig(kind=kind), DOC_CHARS))]
        kept, _, _ = evaltext.clean(texts, set(), grams, DataConfig().eval_overlap)
        step = max(1, len(kept) // docs)
        out[kind] = [t for _, t in kept[::step][:docs]]
    return out


if __name__ == "__main__":
    for dom in DOMAINS:
        for kind, documents in suite(dom).items():
            print(f"{dom}/{kind}: {len(documents)} documents, {sum(map(len, documents)):,} characters; "
                  f"first: {documents[0][:100]!r}")
