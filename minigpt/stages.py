"""The run function of every stage of a job: what it reads from the run folder and what it writes there.

Each function takes the running `Pipeline` (its config, run layout, stage book and the resolved model) and either
one domain (`run_one`: prepare, search, slim, teacher, quantize) or the list of domains to do with a `finish(domain, ...)`
callback (`run_many`: calibrate and recover, which share Ray workers across domains; evaluate and report, which
cover the whole job). Which stage runs when, under which key, is decided by the stage table in minigpt.pipeline;
nothing here skips work or writes a stage manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.config import ConfigError
from minigpt.io import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    from minigpt.pipeline import Pipeline

Finish = Callable[..., None]  # finish(unit, error=None, **extra): records one unit done (or failed)


# ---------------------------------------------------------------------------------------------- prepare


def prepare(p: Pipeline, domain: str) -> None:
    from minigpt import corpora

    corpora.prepare_domain(p.cfg.domain(domain), p.cfg.data, p.tokenizer(), p.layout.data_dir(domain))


def evaltext(p: Pipeline, domain: str) -> None:
    from minigpt import evaltext as ET

    rec = p.cfg.recover
    replay = rec.general_sources if rec.enabled and rec.general_fraction else ()
    ET.prepare_eval_sets(p.cfg.domain(domain), p.cfg.data, p.tokenizer(), p.layout.evaltext(domain), learned=replay)


# -------------------------------------------------------------------------------------------- calibrate


def calibrate(p: Pipeline, todo: list[str], keys: dict[str, str], finish: Finish) -> None:
    """One Ray pass over the calibration shards of every domain to do; a profile per domain."""
    from minigpt import calibrate as K, corpora

    L, cfg = p.layout, p.cfg
    shards = []
    for name in todo:
        data = corpora.DomainData.load(L.data_dir(name))
        # Ledger entries are keyed by the stage key: statistics of other settings are never merged in.
        shards += [K.Shard(f"{name}/{keys[name]}/{s.stem}", name, str(s)) for s in data.shards("calib")]
    K.run_shards(shards, cfg.model, cfg.calibrate, L.ledger, p.spec)
    for name in todo:  # one domain's profile in memory at a time (Gram statistics are large)
        mine = [s for s in shards if s.domain == name]
        profile = K.merge_ledger(L.ledger, mine)
        K.save_profile(L.profile(name), profile, {"model": cfg.model.source, "domain": name, "shards": len(mine),
                                                  "calibrate_dtype": cfg.calibrate.dtype})
        print(K.summarize(name, profile), flush=True)
        del profile
        finish(name)


def general(p: Pipeline, todo: list[None], keys: dict, finish: Finish) -> None:
    """The general text calibrated beside every domain (minigpt.general): shards, then, unless plans are cut
    sequentially (the runners read the shards), its profile, on the calibration workers."""
    from minigpt import calibrate as K, evaltext, general as G, models

    L, cfg = p.layout, p.cfg
    G.prepare_general(L.general, cfg.data, cfg.calibrate.general_tokens, cfg.calibrate.general_sources, p.tokenizer(),
                      lambda: models.load_model(p.model_dir, cfg.calibrate.dtype, cfg.model.trust_remote_code),
                      banned=evaltext.banned_hashes(cfg.domains, cfg.data) if cfg.calibrate.general_sources else ())
    if cfg.prune.general_weight > 0 and not cfg.prune.sequential:
        key = keys[None]
        shards = [K.Shard(f"_general/{key}/{s.stem}", "_general", str(s)) for s in G.shards(L.general)]
        K.run_shards(shards, cfg.model, cfg.calibrate, L.ledger, p.spec)
        K.save_profile(L.general_profile, K.merge_ledger(L.ledger, shards),
                       {"model": cfg.model.source, "domain": "_general", "shards": len(shards)})
    finish(None)


def planning_stats(p: Pipeline, domain: str):
    """The statistics a domain's plan is cut from: its profile, mixed with the general text's at
    prune.general_weight (stats.mix)."""
    from minigpt import calibrate as K, stats as ST

    stats = K.load_profile(p.layout.profile(domain))[0]
    w = p.cfg.prune.general_weight
    return ST.mix(stats, K.load_profile(p.layout.general_profile)[0], w) if w > 0 else stats


# ----------------------------------------------------------------------------------------------- search


def _allocation_seeds(p: Pipeline, domain: str, stats, data) -> list:
    """Shapes with the least predicted loss at 10-50% removed (minigpt.allocate), to warm-start the search: the same
    priced error the fixed-ratio allocation minimises, from the profile and one backward pass."""
    from minigpt import allocate as A, corpora, plan as P, stats as S
    from minigpt.models import widths

    cfg = p.cfg
    dense, _ = p.dense()
    blocks = corpora.read_blocks(data.shards("calib"))[: cfg.prune.taylor_blocks]
    fisher = S.taylor_sums(dense, blocks, cfg.calibrate.batch_size)["taylor_resid"]
    front = A.allocation_front(dense, stats, fisher, (0.1, 0.2, 0.3, 0.4, 0.5), damp=cfg.prune.damp,
                               multiple_of=cfg.search.multiple_of)
    shapes = [P.Shape(tuple(range(widths(dense)["layers"])), c.mlp_width, c.kv_groups) for c in front]
    print(f"[search] {domain}: warm start from the predicted front "
          + ", ".join(f"{c.removed:.0%}: MLP {c.mlp_width}, KV {c.kv_groups}" for c in front), flush=True)
    return shapes


def search(p: Pipeline, domain: str) -> None:
    """NSGA-II over expert shapes of one domain, cut from its profile; writes the front and its plot."""
    from minigpt import calibrate as K, corpora, search as SE

    L, cfg = p.layout, p.cfg
    stats = planning_stats(p, domain)
    data = corpora.DomainData.load(L.data_dir(domain))
    texts = [t for _, t in data.documents(cfg.search.split)]
    initial = _allocation_seeds(p, domain, stats, data) if cfg.prune.reconstruct else []
    res = SE.search_domain(stats, p.model_dir, texts, cfg.search, domain=domain, block_size=cfg.data.block_size,
                           base_model=cfg.model.source, profile=str(L.profile(domain)), dtype=cfg.model.dtype,
                           reconstruct=cfg.prune.reconstruct, damp=cfg.prune.damp, initial=initial)
    SE.plot_front(res, L.search_png(domain))
    SE.write_front(L.search(domain), res)
    print(f"[search] {domain}: front of {len(res.front)} shape(s), {len(res.history)} evaluated", flush=True)


def picked_plans(p: Pipeline, domain: str) -> list:
    """Plans the search picked for this domain (search.points of them, or one within search.budget)."""
    from minigpt import search as SE

    result = SE.SearchResult.from_json(SE.load_front(p.layout.search(domain)))
    picked = SE.pick(result, p.cfg.search.points, p.cfg.search.budget)
    if not picked:
        raise ConfigError(f"search found no plan for domain {domain!r} that removes anything; "
                          "widen search.mlp_fractions or raise search.generations")
    return picked


# ------------------------------------------------------------------------------------------------- slim


def slim(p: Pipeline, name: str) -> None:
    """Plan (searched, sequential or fixed ratio), slim physically, check the parameter count, save."""
    from minigpt import calibrate as K, corpora, models, slim as SL

    L, cfg = p.layout, p.cfg
    dense, tokenizer = p.dense()
    if cfg.search.enabled:
        # The picked shapes are compensated like fixed-ratio plans when prune.reconstruct is on; the search itself
        # scores its candidates uncompensated (known limit, see the README).
        stats, weights = (planning_stats(p, name) if cfg.prune.reconstruct else None), None
        picked = [dataclasses.replace(x, reconstruct=cfg.prune.reconstruct, damp=cfg.prune.damp)
                  for x in picked_plans(p, name)]
        plan = picked[0]
        for k, extra in enumerate(picked[1:], start=1):  # further front points: slimmed and evaluated
            small, tok = SL.slim_expert(dense, tokenizer, extra, stats)
            SL.save_expert(small, tok, L.expert(name, f"search-{k}"),
                           extra_files=ship_files(p, name, f"search-{k}", extra, type(small).__name__))
    elif cfg.prune.sequential:
        stats = K.load_profile(L.profile(name))[0]  # its token counts (vocabulary); the runners sum the rest
        plan, weights = _sequential_plan(p, name, dense, tokenizer, stats)
    else:
        stats, weights = planning_stats(p, name), None
        plan = _fixed_ratio_plan(p, name, dense, tokenizer, stats)
    small, tok = SL.slim_expert(dense, tokenizer, plan, stats, weights)
    total, non_emb = models.count_parameters(small)
    if (total, non_emb) != (plan.params["total"], plan.params["non_embedding"]):
        raise RuntimeError(f"slimmed {name} has {total}/{non_emb} parameters, plan predicts "
                           f"{plan.params['total']}/{plan.params['non_embedding']}")
    # The expert's card and its base model's terms travel in the same atomic folder as its weights.
    SL.save_expert(small, tok, L.expert(name, "pruned"),
                   extra_files=ship_files(p, name, "pruned", plan, type(small).__name__))
    if plan.vocab_keep is not None:
        # The expert's token ids differ from the base's: its train split is re-tokenized for recovery.
        data = corpora.DomainData.load(L.data_dir(name))
        for split in ("train", "valid"):
            corpora.retokenize(data.documents(split), tok, cfg.data.block_size, cfg.data.blocks_per_shard,
                               L.expert(name, split))
    plan.save(L.plan(name))
    print(f"[slim] {name}: {_describe(plan, non_emb)}", flush=True)


def _describe(plan, non_emb: int) -> str:
    dense_ne = plan.params["dense_non_embedding"]
    return (f"{plan.method}, MLP {plan.intermediate_size} -> {plan.mlp_width}, "
            f"KV groups {plan.kv_groups} -> {plan.kv_width or plan.kv_groups}"
            + (f" ({plan.q_width} query heads each)" if plan.q_width else "")
            + f", layers {plan.num_layers} -> {plan.num_layers - len(plan.dropped_layers)}"
            + (f", vocab {plan.vocab_size} -> {len(plan.vocab_keep)}" if plan.vocab_keep else "")
            + (", kept weights refit by least squares" if plan.reconstruct and not plan.replace else "")
            + (f", dropped layers {list(plan.dropped_layers)} replaced by a linear map" if plan.replace else "")
            + f"; non-embedding {dense_ne / 1e6:.1f}M -> {non_emb / 1e6:.1f}M ({1 - non_emb / dense_ne:.1%} removed)")


def _sequential_plan(p: Pipeline, name: str, dense, tokenizer, stats):
    """Layer-by-layer choice and refit on Ray actors that each keep the activations of a share of the domain's
    calibration blocks (minigpt.sequential)."""
    import ray

    from minigpt import corpora, general as G, plan as P, sequential as Q
    from minigpt.models import decoder_layers

    cfg = p.cfg
    blocks = corpora.read_blocks(corpora.DomainData.load(p.layout.data_dir(name)).shards("calib"))
    shares = [s for s in blocks.tensor_split(min(cfg.calibrate.workers, len(blocks))) if len(s)]
    general, weight = None, cfg.prune.general_weight
    if weight > 0:
        # General text rides along on the same runners, its sums weighted to general_weight x the domain's mass.
        text = corpora.read_blocks(G.shards(p.layout.general))
        general = text.tensor_split(len(shares))
        weight *= blocks.numel() / max(text.numel(), 1)
    runners = Q.ray_runners(str(p.model_dir), shares, cfg.calibrate.batch_size, cfg.calibrate.dtype,
                            cfg.calibrate.cpus_per_worker, cfg.calibrate.gpus_per_worker, general, weight)
    vocab = P.vocab_keep(stats["token_counts"], tokenizer, cfg.prune.vocab_min_count) if cfg.prune.vocab else None
    n_layers = len(decoder_layers(dense))
    try:
        return Q.prune_sequential(dense, runners, cfg.prune, domain=name, remote=True, vocab=vocab,
                                  base_model=cfg.model.source, profile=str(p.layout.profile(name)),
                                  on_layer=lambda i: print(f"[slim] {name}: sequential, layer {i + 1}/{n_layers}"
                                                           " pruned and refit", flush=True))
    finally:
        for r in runners:
            ray.kill(r)


def _fixed_ratio_plan(p: Pipeline, name: str, dense, tokenizer, stats):
    from minigpt import calibrate as K, corpora, plan as P, stats as S

    cfg = p.cfg
    others = {o.name: K.load_profile(p.layout.profile(o.name))[0]
              for o in cfg.domains if o.name != name} if cfg.prune.method == "cus-prun" else None
    grad = verify = None
    data = corpora.DomainData.load(p.layout.data_dir(name))
    replaced = cfg.prune.reconstruct and (cfg.prune.method == "depth" or cfg.prune.allocate)
    if cfg.prune.method == "taylor" or replaced:
        # Gradients (one backward pass over part of the calibration split): first-order Taylor importance, and
        # the loss gradient of the residual stream that prices the allocation's and the replaced span's errors.
        blocks = corpora.read_blocks(data.shards("calib"))[: cfg.prune.taylor_blocks]
        grad = S.taylor_sums(dense, blocks, cfg.calibrate.batch_size)
    if cfg.prune.allocate and cfg.prune.verify:
        # Shapes are measured on text the statistics never saw: the validation split (the calibration split, and
        # a warning, when the job has none).
        split = "valid" if "valid" in data.splits and data.shards("valid") else "calib"
        if split == "calib":
            print(f"[slim] {name}: no validation split (data.valid_fraction 0): prune.verify measures shapes on "
                  "calibration blocks", flush=True)
        verify = corpora.read_blocks(data.shards(split))[: max(1, cfg.prune.verify_tokens // cfg.data.block_size)]
    return P.build_plan(stats, dense, cfg.prune, domain=name, other_profiles=others, grad_stats=grad,
                        tokenizer=tokenizer, base_model=cfg.model.source, profile=str(p.layout.profile(name)),
                        verify_blocks=verify, log=lambda line: print(f"[slim] {name}: {line}", flush=True))


# ---------------------------------------------------------------------------------------------- recover


def student_shards(p: Pipeline, domain: str, split: str) -> list[Path]:
    """A split's shards in the expert's vocabulary: base-tokenized, or the expert's own when it was pruned."""
    from minigpt import corpora

    own = p.layout.expert(domain, split)
    if own.is_dir():
        return sorted(own.glob("shard-*.parquet"))
    return corpora.DomainData.load(p.layout.data_dir(domain)).shards(split)


def _general_replay(p: Pipeline, domain: str, train_blocks: int) -> list[Path]:
    """Shards of general text for the domain's training set, in the expert's tokenizer: general_fraction of the
    mixed set. From recover.general_sources: windows spread over their documents, none of which is a held-out,
    validation or eval-source document of any domain (the final figures and early stopping must not have been
    trained on). Without them: the job's general text (minigpt.general; by default the dense model's own samples)."""
    from minigpt import config as C, corpora, evaltext, models

    L, cfg = p.layout, p.cfg
    f = cfg.recover.general_fraction
    want = math.ceil(train_blocks * f / (1 - f))
    if not cfg.recover.general_sources:
        return _replay_general_text(p, domain, want, train_blocks)
    docs = corpora.gather_documents(C.DomainConfig("general", cfg.recover.general_sources), cfg.data)
    banned: set[str] = set()
    for d in p.domains:
        data = corpora.DomainData.load(L.data_dir(d))
        banned |= data.doc_hashes("heldout") | data.doc_hashes("valid")
    banned |= evaltext.banned_hashes(cfg.domains, cfg.data)  # out-of-source text is never trained on either
    docs = [doc for doc in docs if doc[0] not in banned]
    tok = models.load_tokenizer(L.expert(domain, "pruned"), cfg.model.trust_remote_code)
    shards = corpora.retokenize(docs, tok, cfg.data.block_size, cfg.data.blocks_per_shard,
                                L.teacher(domain) / "general", budget=want * cfg.data.block_size, seed=cfg.data.seed)
    got = len(corpora.read_blocks(shards))
    print(f"[teacher] {domain}: {got} general replay blocks from {len(docs):,} documents for {train_blocks} "
          f"train blocks (general_fraction {f:g}{'' if got >= want else f', {want} wanted: the corpus is short'})",
          flush=True)
    return shards


def _replay_general_text(p: Pipeline, domain: str, want: int, train_blocks: int) -> list[Path]:
    """The first `want` blocks of the job's general text as the domain's replay shards: copied where the expert
    keeps the base vocabulary, decoded and re-tokenized where its vocabulary was pruned."""
    from minigpt import corpora, general as G, models, plan as P

    L, cfg = p.layout, p.cfg
    blocks = corpora.read_blocks(G.shards(L.general))[:want]
    out = L.teacher(domain) / "general"
    if P.PruningPlan.load(L.plan(domain)).vocab_keep is None:
        with atomic_dir(out) as tmp:
            ids = blocks.numpy().astype("int32")  # self-sampled text covers no document bytes (general.py)
            corpora.write_block_shards(tmp, ids, ids.astype("int64") * 0, cfg.data.blocks_per_shard)
        shards = G.shards(out)
    else:
        base = p.tokenizer()
        docs = [(f"general-{i}", base.decode(b, skip_special_tokens=True)) for i, b in enumerate(blocks.tolist())]
        tok = models.load_tokenizer(L.expert(domain, "pruned"), cfg.model.trust_remote_code)
        shards = corpora.retokenize(docs, tok, cfg.data.block_size, cfg.data.blocks_per_shard, out,
                                    budget=len(blocks) * cfg.data.block_size, seed=cfg.data.seed)
    got = len(corpora.read_blocks(shards))
    print(f"[teacher] {domain}: {got} general replay blocks of the job's general text for {train_blocks} train "
          f"blocks (general_fraction {cfg.recover.general_fraction:g}"
          f"{'' if got >= want else f', {want} wanted: raise calibrate.general_tokens'})", flush=True)
    return shards


def recovery_task(p: Pipeline, domain: str):
    """What recovery trains a domain's expert from (minigpt.training.RecoveryTask); the teacher stage and the
    recover stage build it the same way."""
    from minigpt import corpora, plan as P, training

    L = p.layout
    plan = P.PruningPlan.load(L.plan(domain))
    general = sorted((L.teacher(domain) / "general").glob("shard-*.parquet"))
    return training.RecoveryTask(
        domain=domain, student_dir=str(L.expert(domain, "pruned")),
        train_shards=tuple(str(s) for s in student_shards(p, domain, "train")),
        out_dir=str(L.expert(domain, "recovered")), checkpoint_dir=str(L.checkpoints(domain)),
        valid_shards=tuple(str(s) for s in student_shards(p, domain, "valid")),
        general_shards=tuple(str(s) for s in general), general_blocks=len(corpora.read_blocks(general)),
        teacher_file=str(L.teacher(domain) / "targets.safetensors"),
        teacher_token_ids=tuple(plan.vocab_keep) if plan.vocab_keep is not None else None)


def teacher(p: Pipeline, domain: str) -> None:
    """The domain's training set (with its general replay blocks) and the dense model's targets on it: top-k
    log-probabilities in distill mode, bits per byte on the validation split always (minigpt.teacher)."""
    import torch

    from minigpt import corpora, teacher as T, training

    L, cfg = p.layout, p.cfg
    shutil.rmtree(L.teacher(domain) / "general", ignore_errors=True)
    if cfg.recover.general_fraction:
        _general_replay(p, domain, len(corpora.read_blocks(student_shards(p, domain, "train"))))
    task = recovery_task(p, domain)
    blocks = training.training_blocks(task)
    teacher_blocks = blocks if task.teacher_token_ids is None else \
        torch.tensor(task.teacher_token_ids, dtype=torch.long)[blocks]
    # The dense reference is scored on the base tokenization of the same validation documents.
    base = dataclasses.replace(task, valid_shards=tuple(
        str(s) for s in corpora.DomainData.load(L.data_dir(domain)).shards("valid")))
    valid, valid_bytes = training.validation_blocks(base, cfg.recover.eval_tokens)
    c = cfg.calibrate
    targets = T.compute_targets(p.model_dir, teacher_blocks, valid, valid_bytes, digest=T.blocks_digest(blocks),
                                k=cfg.recover.distill_topk if cfg.recover.mode == "distill" else 0,
                                temperature=cfg.recover.distill_temperature, dtype=c.dtype,
                                trust_remote_code=cfg.model.trust_remote_code, batch_size=c.batch_size,
                                workers=c.workers, cpus_per_worker=c.cpus_per_worker,
                                gpus_per_worker=c.gpus_per_worker, label=domain)
    T.save_targets(L.teacher(domain) / T.TARGETS, targets)


def recover(p: Pipeline, todo: list[str], keys: dict[str, str], finish: Finish) -> None:
    """DeepSpeed recovery of every domain to do, concurrently on Ray Train; a failed domain fails only itself."""
    from minigpt import recover as R

    tasks = [recovery_task(p, name) for name in todo]
    results = R.recover_all(tasks, p.cfg.recover)
    ok, failed = [], []
    for t in tasks:
        r = results.get(t.domain)
        if r is not None and r.ok:
            ship(p, t.domain, "recovered")  # before the stage is recorded done: a done expert has its card
            finish(t.domain, steps=r.steps, final_loss=r.losses[-1] if r.losses else None,
                   tokens_per_s=r.tokens_per_s, expert_step=r.expert_step, stopped_early=r.stopped_early)
            ok.append(t.domain)
        else:
            err = r.error if r is not None else "no result"
            finish(t.domain, error=err)
            failed.append(f"{t.domain} ({err.splitlines()[0] if err else '?'})")
    print(f"[recover] succeeded: {', '.join(ok) or 'none'}; failed: {', '.join(failed) or 'none'}", flush=True)


# --------------------------------------------------------------------------------------------- quantize


def final_expert(p: Pipeline, domain: str) -> Path:
    """The expert a domain ends with: recovered when its recovery is done, else pruned."""
    return p.layout.expert(domain, "recovered" if p.done("recover", domain) else "pruned")


def quantize(p: Pipeline, domain: str) -> None:
    """int8 weight quantization of the domain's final expert."""
    from minigpt import quantize as Q

    Q.quantize_expert(final_expert(p, domain), p.layout.expert(domain, "int8"), p.cfg.quantize)
    ship(p, domain, "int8")


# ------------------------------------------------------------------------- cards, terms files, GGUF export


def _plan_of(p: Pipeline, domain: str, kind: str):
    """The plan an expert was cut by: the domain's plan, or the search front point a search-<k> expert is."""
    from minigpt import plan as P

    if kind.startswith("search-"):
        picked = picked_plans(p, domain)
        k = int(kind.split("-", 1)[1])
        return picked[k] if k < len(picked) else None
    path = p.layout.plan(domain)
    return P.PruningPlan.load(path) if path.is_file() else None


def _split_facts(p: Pipeline, domain: str, split: str) -> dict | None:
    try:
        man = json.loads((p.layout.data_dir(domain) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    s = (man.get("splits") or {}).get(split) or {}
    return {"tokens": s.get("tokens"), "documents": s.get("documents"),
            "sources": [x.label for x in p.cfg.domain(domain).sources]}


def card_facts(p: Pipeline, domain: str, kind: str, plan, architecture: str, figures: dict | None = None,
               speed: dict | None = None, gguf: tuple = ()):
    """What an expert's card states (minigpt.card.CardFacts), from the run folder and the job."""
    import hashlib

    import minigpt
    from minigpt import card as CA, config as C, licence as LI

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
        job_hash=hashlib.sha256(C.dump(cfg).encode()).hexdigest()[:16], version=minigpt.__version__, gguf=gguf)


def ship_files(p: Pipeline, domain: str, kind: str, plan, architecture: str, figures: dict | None = None,
               speed: dict | None = None, gguf: tuple = (), library: str = "transformers") -> dict[str, str]:
    """File name -> text of what makes an expert folder shippable: README.md (its model card) and the base model's
    terms files (LICENSE, use policy, ..., and a NOTICE saying what was modified)."""
    from minigpt import card as CA, licence as LI

    facts = card_facts(p, domain, kind, plan, architecture, figures, speed, gguf)
    lic = facts.licence
    what = (f"structured pruning by minigpt ({plan.method}; MLP width {plan.intermediate_size} -> {plan.mlp_width}, "
            f"{len(plan.layers)} of {plan.num_layers} layers kept)"
            + (", then further training on text of the domain" if facts.recovery is not None else "")
            + (", then int8 weight quantization" if kind == "int8" else "") + ".")
    return {"README.md": CA.render(facts, library), **LI.expert_files(lic, lic.base_model or p.cfg.model.source, what)}


def ship(p: Pipeline, domain: str, kind: str, folder: Path | None = None, figures: dict | None = None,
         speed: dict | None = None, gguf: tuple = (), library: str = "transformers") -> None:
    """Write (or rewrite) the card and terms files of an existing expert folder, each file atomically."""
    from minigpt.io import atomic_write_text

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


def refresh_cards(p: Pipeline, summary: dict, eval_data: dict) -> None:
    """Rewrite every expert's card (and its GGUF folder's) with the figures summary.json and eval.json now hold:
    the cards and the report state the same numbers."""
    from minigpt import card as CA

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


def _heldout_blocks(p: Pipeline, domain: str, folder: Path, n: int):
    """Up to n blocks of the domain's held-out documents in the expert's own tokenization (its vocabulary may be
    cut): text for reading an exported file back, never for choosing anything."""
    import torch

    from minigpt import corpora, models

    bs = p.cfg.data.block_size
    tok = models.load_tokenizer(folder, p.cfg.model.trust_remote_code)
    ids: list[int] = []
    for _, text in corpora.DomainData.load(p.layout.data_dir(domain)).documents("heldout"):
        ids += tok(text)["input_ids"]
        if len(ids) >= n * bs:
            break
    k = min(n, len(ids) // bs)
    return torch.tensor(ids[: k * bs], dtype=torch.long).reshape(k, bs) if k else None


def export(p: Pipeline, domain: str) -> None:
    """GGUF files of the domain's final expert (export.gguf), each read back with transformers and compared with the
    expert on held-out blocks, with the expert's card and terms files, into experts/<domain>/gguf/ (one atomic
    folder)."""
    from minigpt import export as EX
    from minigpt.io import atomic_dir, atomic_write_text

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


# --------------------------------------------------------------------------------------- evaluate, report


def model_table(p: Pipeline) -> dict[str, str]:
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


def evaluate(p: Pipeline, todo: list[None], keys: dict, finish: Finish) -> None:
    from minigpt import evaluate as E

    cfg = p.cfg
    E.evaluate_run(p.layout.run_dir, model_table(p), [d.name for d in cfg.domains], cfg.evaluate,
                   cfg.data.block_size, oos={d.name: (p.layout.evaltext(d.name), [s.label for s in d.eval_sources])
                        for d in cfg.domains if d.eval_sources})
    finish(None)


def _oos_rows(models: dict, domain: str) -> dict[str, dict]:
    """Per out-of-source text of a domain: the dense perplexity and each expert's ratio to it with its interval."""
    rows = {}
    for source, cell in ((models["dense"].get("oos") or {}).get(domain) or {}).items():
        row = {"dense_ppl": cell["ppl"], "dense_ppl_ci": cell.get("ppl_ci"), "documents": cell.get("documents_measured")}
        for kind in ("pruned", "recovered"):
            mine = (((models.get(f"{domain}/{kind}") or {}).get("oos") or {}).get(domain) or {}).get(source)
            if mine:
                row[f"{kind}_ppl_ratio"], row[f"{kind}_ppl_ratio_ci"] = mine.get("ppl_ratio"), mine.get("ppl_ratio_ci")
        rows[source] = row
    return rows


def summarize(p: Pipeline, eval_data: dict) -> dict:
    """summary.json: per domain the dense, pruned and recovered perplexity (ratios to dense with their intervals) and
    bits per byte on the held-out split and on each out-of-source text ("oos", and the worst of them per expert:
    "<kind>_oos_worst"), sizes, recovery."""
    rows = {}
    models = eval_data["models"]
    dense = models["dense"]
    for d in p.cfg.domains:
        row = {"dense_ppl": dense["domains"][d.name]["ppl"], "dense_ppl_ci": dense["domains"][d.name].get("ppl_ci"),
               "dense_bpb": dense["domains"][d.name]["bits_per_byte"]}
        for kind in ("pruned", "recovered"):
            m = models.get(f"{d.name}/{kind}")
            if m:
                row[f"{kind}_ppl"] = m["domains"][d.name]["ppl"]
                # The expert's perplexity ÷ dense and its bootstrap interval (paired over held-out documents).
                row[f"{kind}_ppl_ratio"] = m["domains"][d.name].get("ppl_ratio")
                row[f"{kind}_ppl_ratio_ci"] = m["domains"][d.name].get("ppl_ratio_ci")
                row[f"{kind}_bpb"] = m["domains"][d.name]["bits_per_byte"]
                row[f"{kind}_non_embedding"] = m["size"]["non_embedding_params"]
        row["oos"] = _oos_rows(models, d.name)
        for kind in ("pruned", "recovered"):
            worst = max(((src, r[f"{kind}_ppl_ratio"], r.get(f"{kind}_ppl_ratio_ci")) for src, r in row["oos"].items()
                         if r.get(f"{kind}_ppl_ratio") is not None), key=lambda c: c[1], default=None)
            if worst:
                row[f"{kind}_oos_worst"] = {"source": worst[0], "ppl_ratio": worst[1], "ppl_ratio_ci": worst[2]}
        row["dense_non_embedding"] = dense["size"]["non_embedding_params"]
        if "pruned_non_embedding" in row:
            row["removed_fraction"] = 1 - row["pruned_non_embedding"] / row["dense_non_embedding"]
        rec = p.book.read("recover", d.name)
        row["recover_status"] = rec.get("status") if rec else ("disabled" if not p.cfg.recover.enabled else "?")
        # The recovery curve (validation bits/byte vs tokens trained) for the report, from the expert's manifest.
        try:
            man = json.loads((p.layout.expert(d.name, "recovered") / "_manifest.json").read_text())
        except (OSError, ValueError):
            man = None
        if isinstance(man, dict):
            row["recovery"] = {k: man.get(k) for k in ("curve", "dense_valid_bpb", "expert_step", "stopped_early",
                                                       "tokens", "mode", "steps", "total_steps")}
            row["recovery"]["curve"] = list(man.get("curve") or [])
        rows[d.name] = row
    summary = {"job": p.cfg.name, "model": p.cfg.model.source, "method": p.cfg.prune.method,
               "target": p.cfg.prune.target, "domains": rows}
    atomic_write_json(p.layout.summary, summary)
    return summary


def searches(p: Pipeline) -> dict[str, dict]:
    """The search front and plot of every domain that has them (for the report)."""
    out = {}
    if p.cfg.search.enabled:
        for d in p.cfg.domains:
            path, png = p.layout.search(d.name), p.layout.search_png(d.name)
            if path.is_file() and png.is_file():
                out[d.name] = {"front": json.loads(path.read_text())["front"], "png": png.read_bytes()}
    return out


def report(p: Pipeline, todo: list[None], keys: dict, finish: Finish) -> None:
    from minigpt import report as RP

    L = p.layout
    plans = {d.name: json.loads(L.plan(d.name).read_text()) for d in p.cfg.domains if L.plan(d.name).is_file()}
    RP.write_report(L.run_dir, json.loads(L.eval_json.read_text()), plans, {"name": p.cfg.name},
                    searches=searches(p))
    finish(None)
