"""The expert folders of a run: which exist (`model_table`, `final_expert`), what makes each shippable (its model
card and the base model's terms files: `ship`, `ship_files`, rewritten with the evaluation's figures by
`refresh_cards`), and the export stage that writes GGUF files of each final expert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

import minigpt
from minigpt import card as CA, corpora, export as EX, jobfile as J, licence as LI, models
from minigpt.domainplan import picked_plans
from minigpt.io import atomic_dir, atomic_write_json, atomic_write_text
from minigpt.plandata import PruningPlan
from minigpt.runfolder import Run


def final_expert(p: Run, domain: str) -> Path:
    """The expert a domain ends with: recovered when its recovery is done, else pruned."""
    return p.layout.expert(domain, "recovered" if p.done("recover", domain) else "pruned")


def _plan_of(p: Run, domain: str, kind: str):
    """The plan an expert was cut by: the domain's plan, or the search front point a search-<k> expert is."""
    if kind.startswith("search-"):
        picked = picked_plans(p, domain)
        k = int(kind.split("-", 1)[1])
        return picked[k] if k < len(picked) else None
    path = p.layout.plan(domain)
    return PruningPlan.load(path) if path.is_file() else None


def _split_facts(p: Run, domain: str, split: str) -> dict | None:
    try:
        man = json.loads((p.layout.data_dir(domain) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    s = (man.get("splits") or {}).get(split) or {}
    return {"tokens": s.get("tokens"), "documents": s.get("documents"),
            "sources": [x.label for x in p.cfg.domain(domain).sources]}


def card_facts(p: Run, domain: str, kind: str, plan, architecture: str, figures: dict | None = None,
               speed: dict | None = None, gguf: tuple = ()):
    """What an expert's card states (minigpt.card.CardFacts), from the run folder and the job."""
    cfg = p.cfg
    recovered = kind == "recovered" or (kind == "int8" and p.done("recover", domain))
    try:
        manifest = json.loads((p.layout.expert(domain, "recovered") / "_manifest.json").read_text()) \
            if recovered else None
    except (OSError, ValueError):
        manifest = None
    return CA.CardFacts(
        name=f"{cfg.name}-{domain}-{kind}", job=cfg.name, domain=domain, kind=kind, base=cfg.model.source,
        architecture=architecture, licence=LI.base_licence(cfg.model.source, str(p.model_dir)), plan=plan,
        prune=dataclasses.asdict(cfg.prune), recover=dataclasses.asdict(cfg.recover) if recovered else None,
        calib=_split_facts(p, domain, "calib"), heldout=_split_facts(p, domain, "heldout"),
        recovery=manifest, figures=figures, speed=speed, confidence=cfg.evaluate.confidence,
        job_hash=hashlib.sha256(J.dump(cfg).encode()).hexdigest()[:16], version=minigpt.__version__, gguf=gguf)


def ship_files(p: Run, domain: str, kind: str, plan, architecture: str, figures: dict | None = None,
               speed: dict | None = None, gguf: tuple = (), library: str = "transformers") -> dict[str, str]:
    """File name -> text of what makes an expert folder shippable: README.md (its model card) and the base model's
    terms files (LICENSE, use policy, ..., and a NOTICE saying what was modified)."""
    facts = card_facts(p, domain, kind, plan, architecture, figures, speed, gguf)
    lic = facts.licence
    what = (f"structured pruning by minigpt ({plan.method}; MLP width {plan.intermediate_size} -> {plan.mlp_width}, "
            f"{len(plan.layers)} of {plan.num_layers} layers kept)"
            + (", then further training on text of the domain" if facts.recovery is not None else "")
            + (", then int8 weight quantization" if kind == "int8" else "") + ".")
    return {"README.md": CA.render(facts, library), **LI.expert_files(lic, lic.base_model or p.cfg.model.source, what)}


def ship(p: Run, domain: str, kind: str, folder: Path | None = None, figures: dict | None = None,
         speed: dict | None = None, gguf: tuple = (), library: str = "transformers") -> None:
    """Write (or rewrite) the card and terms files of an existing expert folder, each file atomically."""
    folder = Path(folder or p.layout.expert(domain, kind))
    plan = _plan_of(p, domain, kind)
    if plan is None or not folder.is_dir():
        return
    src = folder if library != "gguf" else p.layout.expert(domain, kind)
    try:
        arch = (json.loads((src / "config.json").read_text()).get("architectures") or ["?"])[0]
    except (OSError, ValueError):
        arch = "?"
    for name, text in ship_files(p, domain, kind, plan, arch, figures, speed, gguf, library).items():
        atomic_write_text(folder / name, text)


def refresh_cards(p: Run, summary: dict, eval_data: dict) -> None:
    """Rewrite every expert's card (and its GGUF folder's) with the figures summary.json and eval.json now hold:
    the cards and the report state the same numbers."""
    models = eval_data.get("models") or {}
    for label in model_table(p):
        if label == "dense":
            continue
        domain, kind = label.split("/", 1)
        fig = (CA.figures(summary["domains"].get(domain), kind) if kind in ("pruned", "recovered")
               else CA.eval_figures(eval_data, label, domain))
        ship(p, domain, kind, figures=fig, speed=(models.get(label) or {}).get("speed"))
    for domain in p.domains:
        gdir = p.layout.expert(domain, "gguf")
        try:
            rec = json.loads((gdir / "export.json").read_text())
        except (OSError, ValueError):
            continue
        kind, label = rec["kind"], f"{domain}/{rec['kind']}"
        fig = CA.figures(summary["domains"].get(domain), kind)
        ship(p, domain, kind, gdir, figures=fig, speed=(models.get(label) or {}).get("speed"),
             gguf=tuple(rec["files"]), library="gguf")


def _heldout_blocks(p: Run, domain: str, folder: Path, n: int):
    """Up to n blocks of the domain's held-out documents in the expert's own tokenization (its vocabulary may be
    cut): text for reading an exported file back, never for choosing anything."""
    bs = p.cfg.data.block_size
    tok = models.load_tokenizer(folder, p.cfg.model.trust_remote_code)
    ids: list[int] = []
    for _, text in corpora.DomainData.load(p.layout.data_dir(domain)).documents("heldout"):
        ids += tok(text)["input_ids"]
        if len(ids) >= n * bs:
            break
    k = min(n, len(ids) // bs)
    return torch.tensor(ids[: k * bs], dtype=torch.long).reshape(k, bs) if k else None


def export(p: Run, domain: str) -> None:
    """GGUF files of the domain's final expert (export.gguf), each read back with transformers and compared with the
    expert on held-out blocks, with the expert's card and terms files, into experts/<domain>/gguf/ (one atomic
    folder)."""
    cfg = p.cfg.export
    src = final_expert(p, domain)
    EX.read_config(src)  # an architecture it cannot export: one line, before anything is written
    blocks = _heldout_blocks(p, domain, src, cfg.verify_blocks) if cfg.verify_blocks else None
    with atomic_dir(p.layout.expert(domain, "gguf")) as tmp:
        files = [EX.export_gguf(src, tmp / EX.file_name(src, t), t, name=f"{p.cfg.name}-{domain}-{src.name}")
                 for t in cfg.gguf]
        if blocks is not None:
            for f, v in zip(files, EX.verify(src, [tmp / f["file"] for f in files], blocks)):
                f["verify"] = v
                bad = EX.problem(f)
                if bad and bad[0]:
                    raise RuntimeError(f"export {domain}: {bad[1]}")
                if bad:
                    print(f"[export] {domain}: warning: {bad[1]}", flush=True)
        atomic_write_json(tmp / "export.json", {"kind": src.name, "source": str(src), "files": files})
        plan = _plan_of(p, domain, src.name)
        arch = (json.loads((src / "config.json").read_text()).get("architectures") or ["?"])[0]
        for name, text in ship_files(p, domain, src.name, plan, arch, gguf=tuple(files), library="gguf").items():
            atomic_write_text(tmp / name, text)
    print(f"[export] {domain}: " + "; ".join(
        f"{f['file']} {f['bytes'] / 1e6:.1f} MB" + (f", logits within {f['verify']['max_abs_logit_diff']:.3g}, "
                                                    f"perplexity {f['verify']['ppl_ratio']:.4f}x the expert's"
                                                    if 'ppl_ratio' in (f.get('verify') or {}) else "")
        for f in files), flush=True)


def model_table(p: Run) -> dict[str, str]:
    """Every model the evaluation measures: label -> HF folder."""
    L = p.layout
    models = {"dense": str(p.model_dir)}
    for d in p.cfg.domains:
        pruned, recovered = L.expert(d.name, "pruned"), L.expert(d.name, "recovered")
        if pruned.is_dir():
            models[f"{d.name}/pruned"] = str(pruned)
        # A recovered folder counts only when its stage is recorded as done (not a leftover of a failed run).
        if p.cfg.recover.enabled and recovered.is_dir() and p.done("recover", d.name):
            models[f"{d.name}/recovered"] = str(recovered)
        extras = sorted(x for x in L.expert(d.name, "").glob("search-*") if x.is_dir())
        if p.cfg.quantize.enabled:
            extras.append(L.expert(d.name, "int8"))
        for x in extras:
            if x.is_dir():
                models[f"{d.name}/{x.name}"] = str(x)
    return models
