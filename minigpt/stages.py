"""The run function of every stage of a job: what it reads from the run folder and what it writes there.

Each function takes the running job (minigpt.runfolder.Run: its config, run layout, stage book and the resolved model) and either
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

import torch

from minigpt import (allocate as A, config as C, corpora, evaltext as ET, evaluate as E, experts as X, general as G,
                     models, plan as P, quantize as Q, recover as R, report as RP, search as SE, slim as SL, stats as S,
                     training)
from minigpt.domainplan import plan_domain, planning_stats
from minigpt.evalpass import open_forward
from minigpt.io import atomic_dir, atomic_write_json
from minigpt.layerstore import LayerStore
from minigpt.slimstream import slim_to_folder
from minigpt.experts import final_expert, model_table, ship
from minigpt.runfolder import Run

Finish = Callable[..., None]  # finish(unit, error=None, **extra): records one unit done (or failed)


# ---------------------------------------------------------------------------------------------- prepare


def prepare(p: Run, domain: str) -> None:
    corpora.prepare_domain(p.cfg.domain(domain), p.cfg.data, p.tokenizer(), p.layout.data_dir(domain))


def evaltext(p: Run, domain: str) -> None:
    rec = p.cfg.recover
    replay = rec.general_sources if rec.enabled and rec.general_fraction else ()
    ET.prepare_eval_sets(p.cfg.domain(domain), p.cfg.data, p.tokenizer(), p.layout.evaltext(domain), learned=replay)


# -------------------------------------------------------------------------------------------- calibrate


def calibrate(p: Run, todo: list[str], keys: dict[str, str], finish: Finish) -> None:
    """One Ray pass over the calibration shards of every domain to do; a profile per domain."""
    from minigpt import calibrate as K  # Ray comes with it: imported when the stage runs, not with the pipeline

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


def general(p: Run, todo: list[None], keys: dict, finish: Finish) -> None:
    """The general text calibrated beside every domain (minigpt.general): shards, then, unless plans are cut
    sequentially (the runners read the shards), its profile, on the calibration workers."""
    from minigpt import calibrate as K  # Ray comes with it: imported when the stage runs, not with the pipeline

    L, cfg = p.layout, p.cfg
    G.prepare_general(L.general, cfg.data, cfg.calibrate.general_tokens, cfg.calibrate.general_sources, p.tokenizer(),
                      lambda: open_forward(p.model_dir, cfg.calibrate.dtype, cfg.model.trust_remote_code,
                                           streamed=cfg.calibrate.streams_whole_model_stages),
                      banned=ET.banned_hashes(cfg.domains, cfg.data) if cfg.calibrate.general_sources else ())
    if cfg.prune.general_weight > 0 and not cfg.prune.sequential:
        key = keys[None]
        shards = [K.Shard(f"_general/{key}/{s.stem}", "_general", str(s)) for s in G.shards(L.general)]
        K.run_shards(shards, cfg.model, cfg.calibrate, L.ledger, p.spec)
        K.save_profile(L.general_profile, K.merge_ledger(L.ledger, shards),
                       {"model": cfg.model.source, "domain": "_general", "shards": len(shards)})
    finish(None)


# ----------------------------------------------------------------------------------------------- search


def _allocation_seeds(p: Run, domain: str, stats, data) -> list:
    """Shapes with the least predicted loss at 10-50% removed (minigpt.allocate), to warm-start the search: the same
    priced error the fixed-ratio allocation minimises, from the profile and one backward pass."""
    cfg = p.cfg
    dense, _ = p.dense()
    blocks = corpora.read_blocks(data.shards("calib"))[: cfg.prune.taylor_blocks]
    fisher = S.taylor_sums(dense, blocks, cfg.calibrate.batch_size)["taylor_resid"]
    front = A.allocation_front(dense, stats, fisher, (0.1, 0.2, 0.3, 0.4, 0.5), damp=cfg.prune.damp,
                               multiple_of=cfg.search.multiple_of)
    shapes = [P.Shape(tuple(range(models.widths(dense)["layers"])), c.mlp_width, c.kv_groups) for c in front]
    print(f"[search] {domain}: warm start from the predicted front "
          + ", ".join(f"{c.removed:.0%}: MLP {c.mlp_width}, KV {c.kv_groups}" for c in front), flush=True)
    return shapes


def search(p: Run, domain: str) -> None:
    """NSGA-II over expert shapes of one domain, cut from its profile; writes the front and its plot."""
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


# ------------------------------------------------------------------------------------------------- slim


def slim(p: Run, name: str) -> None:
    """Plan the domain in the job's mode (domainplan.plan_domain), slim physically, save. A sequential plan with
    calibrate.streamed never loads the whole model: the driver and slimming read one layer at a time."""
    if p.cfg.prune.sequential and p.cfg.calibrate.streams and not p.cfg.search.enabled:
        store, tokenizer = LayerStore(p.model_dir, dtype=torch.float32, trust_remote_code=p.cfg.model.trust_remote_code), \
            p.tokenizer()
        planned = plan_domain(p, name, store, tokenizer)
        skeleton = store.skeleton()
        _save_pruned(p, name, planned.plan, models.skeleton(SL.slim_config(skeleton, planned.plan)),
                     lambda out, files: slim_to_folder(store, planned.plan, out, planned.weights, tokenizer,
                                                       extra_files=files), type(skeleton).__name__)
        return
    dense, tokenizer = p.dense()
    planned = plan_domain(p, name, dense, tokenizer)
    for k, extra in enumerate(planned.extra, start=1):  # further search front points: slimmed and evaluated
        small, tok = SL.slim_expert(dense, tokenizer, extra, planned.stats)
        SL.save_expert(small, tok, p.layout.expert(name, f"search-{k}"),
                       extra_files=X.ship_files(p, name, f"search-{k}", extra, type(small).__name__))
    small, tok = SL.slim_expert(dense, tokenizer, planned.plan, planned.stats, planned.weights)
    _save_pruned(p, name, planned.plan, small, lambda out, files: SL.save_expert(small, tok, out, extra_files=files),
                 type(small).__name__)


def _save_pruned(p: Run, name: str, plan, small, write, architecture: str) -> None:
    """Check the slimmed model's parameter count (`small`: the model, or its skeleton) against the plan's, then
    `write(folder, extra_files)` the expert with its card and terms files, its train and validation splits in its
    own vocabulary when that was cut, and the plan."""
    L, cfg = p.layout, p.cfg
    total, non_emb = models.count_parameters(small)
    if (total, non_emb) != (plan.params["total"], plan.params["non_embedding"]):
        raise RuntimeError(f"slimmed {name} has {total}/{non_emb} parameters, plan predicts "
                           f"{plan.params['total']}/{plan.params['non_embedding']}")
    # The expert's card and its base model's terms travel in the same atomic folder as its weights.
    write(L.expert(name, "pruned"), X.ship_files(p, name, "pruned", plan, architecture))
    if plan.vocab_keep is not None:
        tok = models.load_tokenizer(L.expert(name, "pruned"), cfg.model.trust_remote_code)
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


# ---------------------------------------------------------------------------------------------- recover


def student_shards(p: Run, domain: str, split: str) -> list[Path]:
    """A split's shards in the expert's vocabulary: base-tokenized, or the expert's own when it was pruned."""
    own = p.layout.expert(domain, split)
    if own.is_dir():
        return sorted(own.glob("shard-*.parquet"))
    return corpora.DomainData.load(p.layout.data_dir(domain)).shards(split)


def _general_replay(p: Run, domain: str, train_blocks: int) -> list[Path]:
    """Shards of general text for the domain's training set, in the expert's tokenizer: general_fraction of the
    mixed set. From recover.general_sources: windows spread over their documents, none of which is a held-out,
    validation or eval-source document of any domain (the final figures and early stopping must not have been
    trained on). Without them: the job's general text (minigpt.general; by default the dense model's own samples)."""
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
    banned |= ET.banned_hashes(cfg.domains, cfg.data)  # out-of-source text is never trained on either
    docs = [doc for doc in docs if doc[0] not in banned]
    tok = models.load_tokenizer(L.expert(domain, "pruned"), cfg.model.trust_remote_code)
    shards = corpora.retokenize(docs, tok, cfg.data.block_size, cfg.data.blocks_per_shard,
                                L.teacher(domain) / "general", budget=want * cfg.data.block_size, seed=cfg.data.seed)
    got = len(corpora.read_blocks(shards))
    print(f"[teacher] {domain}: {got} general replay blocks from {len(docs):,} documents for {train_blocks} "
          f"train blocks (general_fraction {f:g}{'' if got >= want else f', {want} wanted: the corpus is short'})",
          flush=True)
    return shards


def _replay_general_text(p: Run, domain: str, want: int, train_blocks: int) -> list[Path]:
    """The first `want` blocks of the job's general text as the domain's replay shards: copied where the expert
    keeps the base vocabulary, decoded and re-tokenized where its vocabulary was pruned."""
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
        texts = [base.decode(b, skip_special_tokens=True) for b in blocks.tolist()]
        docs = [(corpora.doc_hash(t, cfg.data.salt), t) for t in texts]  # documents are keyed by their hash
        tok = models.load_tokenizer(L.expert(domain, "pruned"), cfg.model.trust_remote_code)
        shards = corpora.retokenize(docs, tok, cfg.data.block_size, cfg.data.blocks_per_shard, out,
                                    budget=len(blocks) * cfg.data.block_size, seed=cfg.data.seed)
    got = len(corpora.read_blocks(shards))
    print(f"[teacher] {domain}: {got} general replay blocks of the job's general text for {train_blocks} train "
          f"blocks (general_fraction {cfg.recover.general_fraction:g}"
          f"{'' if got >= want else f', {want} wanted: raise calibrate.general_tokens'})", flush=True)
    return shards


def recovery_task(p: Run, domain: str):
    """What recovery trains a domain's expert from (minigpt.training.RecoveryTask); the teacher stage and the
    recover stage build it the same way."""
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


def teacher(p: Run, domain: str) -> None:
    """The domain's training set (with its general replay blocks) and the dense model's targets on it: top-k
    log-probabilities in distill mode, bits per byte on the validation split always (minigpt.teacher)."""
    from minigpt import teacher as T  # Ray comes with it: imported when the stage runs, not with the pipeline

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
                                gpus_per_worker=c.gpus_per_worker, label=domain, streamed=c.streams_whole_model_stages,
                                hidden_budget=c.stream_budget)
    T.save_targets(L.teacher(domain) / T.TARGETS, targets)


def recover(p: Run, todo: list[str], keys: dict[str, str], finish: Finish) -> None:
    """DeepSpeed recovery of every domain to do, concurrently on Ray Train; a failed domain fails only itself."""
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


def quantize(p: Run, domain: str) -> None:
    """int8 weight quantization of the domain's final expert."""
    Q.quantize_expert(final_expert(p, domain), p.layout.expert(domain, "int8"), p.cfg.quantize)
    ship(p, domain, "int8")


# ------------------------------------------------------------------------- cards, terms files, GGUF export


# --------------------------------------------------------------------------------------- evaluate, report


def evaluate(p: Run, todo: list[None], keys: dict, finish: Finish) -> None:
    cfg = p.cfg
    E.evaluate_run(p.layout.run_dir, model_table(p), [d.name for d in cfg.domains], cfg.evaluate,
                   cfg.data.block_size, oos={d.name: (p.layout.evaltext(d.name), [s.label for s in d.eval_sources])
                        for d in cfg.domains if d.eval_sources},
                   streamed=cfg.calibrate.streams_whole_model_stages,
                   hidden_budget=cfg.calibrate.stream_budget)
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


def summarize(p: Run, eval_data: dict) -> dict:
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


def searches(p: Run) -> dict[str, dict]:
    """The search front and plot of every domain that has them (for the report)."""
    out = {}
    if p.cfg.search.enabled:
        for d in p.cfg.domains:
            path, png = p.layout.search(d.name), p.layout.search_png(d.name)
            if path.is_file() and png.is_file():
                out[d.name] = {"front": json.loads(path.read_text())["front"], "png": png.read_bytes()}
    return out


def report(p: Run, todo: list[None], keys: dict, finish: Finish) -> None:
    L = p.layout
    plans = {d.name: json.loads(L.plan(d.name).read_text()) for d in p.cfg.domains if L.plan(d.name).is_file()}
    RP.write_report(L.run_dir, json.loads(L.eval_json.read_text()), plans, {"name": p.cfg.name},
                    searches=searches(p))
    finish(None)
