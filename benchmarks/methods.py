"""Pruning methods compared on SmolLM2-135M for the demo domains, on the out-of-source suite.

For each demo domain (licenses / hpo / python-stdlib) the model is profiled once on the domain's calibration split
with every statistic (base sums, Gram matrices, depth-replacement moments for the cut lengths the targets need), and
once on the general text a job calibrates beside the domains (8,192 tokens the dense model samples itself,
minigpt.general). Then for every method, every target (share of non-embedding parameters removed) and compensation
off / on (`prune.reconstruct`), a plan is built, the model is slimmed physically into a stock checkpoint and scored,
with no training, on:
  * the domain's own held-out split (documents of the calibration source never calibrated on), and
  * every text of the out-of-source suite (benchmarks/othertext.py: per domain one text of the calibration
    source's form from another source and two or three of other forms) - the figures that count.
Each figure is perplexity / the dense model's perplexity on the same text.

Prints a table per domain, then one line of JSON (see `figures`): the lowest worst-case out-of-source ratio of any
variant per target and domain (`best_<pct>_<domain>`), the job default's ratio per text and its worst
(`default_<pct>_<domain>_<text>`, `worst_<pct>_<domain>`), plain contextual's (`contextual_...`,
`baseline_worst_...`) and whether the default is no worse on every text (`noharm_<pct>_<domain>`).

`default` runs exactly what a job gets from PruneConfig's defaults at each target.
A method may carry options:
  * `wanda-sp+alloc`: the allocation chooses the stock shape (replaced layers, KV groups, MLP width;
    prune.allocate), measuring its 4 shortlisted shapes on the domain's validation split (prune.verify);
    `+alloc0` trusts the prediction alone;
  * `wanda-sp+seq`: pruned and refit layer by layer on the pruned model's own activations (prune.sequential;
    compensated runs only); `+stream` the same with every MLP output refit toward the dense model's residual
    stream (prune.refit_target stream);
  * `+sd0.01` sets the stream target's correction ridge (prune.stream_damp) to 0.01; `+sa` / `+sa0` turn on /
    off the correction of every attention output toward the dense stream (prune.stream_attn; default on);
  * `+q2` keeps 2 query heads in every KV group, `+kv2` keeps 2 KV groups per layer;
  * `+g0.25` adds the general text at prune.general_weight 0.25 (one-shot: stats.mix of the profiles; sequential:
    the runners' weighted batch groups).

`--model gemma3-270m` (after `make gemma-setup`) runs the same comparison on Gemma-3-270M.

Usage:
  .venv/bin/python benchmarks/methods.py [--targets 0.2,0.3,0.5] [--methods obs,wanda-sp,...] [--damps 0.01]
                                         [--calib-tokens 16384] [--model smollm2-135m] [--work runs/bench-methods]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import othertext  # noqa: E402

from minigpt import corpora, general as G, plan as P, refit, sequential, slim as SL, stats as S  # noqa: E402
from minigpt.config import DataConfig, DomainConfig, ModelConfig, PruneConfig, SourceConfig  # noqa: E402
from minigpt.evaluate import lm_metrics  # noqa: E402
from minigpt.models import count_parameters, load_model, load_tokenizer, resolve  # noqa: E402

DOMAINS = {"legal": "licenses", "medical": "hpo", "code": "python-stdlib"}
METHODS = ("obs", "wanda-sp", "contextual", "cus-prun", "taylor", "depth", "magnitude", "random")


def _profile(model, blocks, spec: S.StatSpec, path: Path, batch: int, taylor_blocks: int) -> tuple[dict, dict]:
    """Every statistic of one domain (cached on disk: the Gram pass is the slow part of a run)."""
    saved = load_file(str(path)) if path.is_file() else {}
    prof = {k: v for k, v in saved.items() if not k.startswith("taylor")}
    grad = {k: v for k, v in saved.items() if k.startswith("taylor")}
    stale = {k for k, s in S.stat_shapes(model, spec).items() if k not in prof or tuple(prof[k].shape) != s}
    if not stale and "taylor_resid" in grad:
        return prof, grad
    t0 = time.time()
    if stale:
        # Only what is stale is collected again (e.g. the depth moments after their layout changed).
        again = S.StatSpec(gram=spec.gram and any(k.endswith("gram") and "out" not in k for k in stale)
                           or "tokens" in stale, depth_spans=spec.depth_spans)
        prof.update(S.accumulate(model, blocks, batch_size=batch, spec=again))
    t1 = time.time()
    grad = S.taylor_sums(model, blocks[:taylor_blocks], batch_size=batch)
    print(f"[bench] profile {blocks.numel()} tokens {t1 - t0:.0f}s, taylor sums {time.time() - t1:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in {**prof, **grad}.items()}, str(path))
    return prof, grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.2,0.3,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--damps", default="0.01", help="prune.damp values to compare (compensated runs)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--model", default="smollm2-135m", help="a built-in alias or a model folder")
    ap.add_argument("--work", default=None, help="data and profile cache (default: runs/bench-methods[-<model>])")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=16, help="blocks of each evaluation text")
    ap.add_argument("--taylor-blocks", type=int, default=8)
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--no-plain", action="store_true", help="only compensated runs")
    args = ap.parse_args()
    t0 = time.time()
    targets = [float(t) for t in args.targets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    damps = [float(d) for d in args.damps.split(",")]
    domains = [d for d in args.domains.split(",") if d]
    # Tokenized data and profiles belong to one model: another model caches them in a folder of its own.
    work = Path(args.work or "runs/bench-methods" + ("" if args.model == "smollm2-135m" else
                                                     f"-{Path(args.model).name}"))
    folder = resolve(ModelConfig(source=args.model))
    dense = load_model(folder)
    tok = load_tokenizer(folder)
    # Half the documents calibrate: the licences corpus is small and least squares wants many tokens.
    data_cfg = DataConfig(block_size=args.block_size, calib_tokens=args.calib_tokens, heldout_tokens=4096,
                          train_tokens=256, calib_fraction=0.5, heldout_fraction=0.2)
    # Depth moments are collected only when a depth method (or +alloc) runs; a cached profile gains them when needed.
    spans = {P.depth_layers(dense, t) for t in (0.2, 0.3, 0.5, *targets)} \
        if any(m.split("+")[0] == "depth" for m in methods) else set()
    if any("+alloc" in m for m in methods):  # +alloc and +alloc0
        for t in targets:
            spans |= set(P.stat_spec(PruneConfig(target=t, allocate=True), dense).depth_spans)
    spec = S.StatSpec(gram=True, depth_spans=tuple(sorted(spans)))
    print(f"[bench] profile per domain: {S.stats_bytes(dense, spec) / 2**30:.2f} GiB", flush=True)

    texts, profiles, grads, calib, valid = {}, {}, {}, {}, {}
    for name in domains:
        out = work / "data" / f"{name}-{args.calib_tokens}"
        try:
            data = corpora.DomainData.load(out)
        except FileNotFoundError:
            data = corpora.prepare_domain(DomainConfig(name, (SourceConfig(kind=DOMAINS[name]),)), data_cfg, tok, out)
        # The domain's held-out split, then its out-of-source texts (othertext.suite: other sources, other forms).
        texts[name] = {"heldout": [t for _, t in data.documents("heldout")], **othertext.suite(name)}
        blocks = calib[name] = corpora.read_blocks(data.shards("calib"))
        # What +alloc measures its shortlisted shapes on (prune.verify): the validation split, never calibrated on.
        valid[name] = corpora.read_blocks(data.shards("valid"))[: PruneConfig().verify_tokens // args.block_size] \
            if "valid" in data.splits else None
        # Sequential variants collect their own statistics layer by layer: a run of only those skips the profile.
        profiles[name], grads[name] = _profile(dense, blocks, spec, work / "profiles" / f"{name}-{args.calib_tokens}"
                                               ".safetensors", args.batch, args.taylor_blocks) \
            if not all({"seq", "stream"} & set(m.split("+")[1:]) for m in methods) else (None, None)
    # General text (prune.general_weight, `+g<w>` and the default): what a job samples from the dense model itself
    # (minigpt.general), calibrate.general_tokens of it, sampled once and cached with its profile.
    gen_path = work / "general" / "sampled-8192.pt"
    if gen_path.is_file():
        general = torch.load(gen_path)
    else:
        general = G.sample_blocks(dense, tok, 8192 // args.block_size, args.block_size, seed=0,
                                  on_batch=lambda n, _: print(f"[bench] general text: {n} blocks sampled", flush=True))
        gen_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(general, gen_path)
    general_profile = _profile(dense, general, spec, gen_path.with_suffix(".safetensors"), args.batch,
                               args.taylor_blocks)[0]
    print(f"[bench] data + profiles ready in {time.time() - t0:.0f}s", flush=True)

    def metrics(model, d):
        with torch.inference_mode():
            return {kind: lm_metrics(model, tok, tx, args.block_size, args.batch, max_blocks=args.max_blocks)["ppl"]
                    for kind, tx in texts[d].items()}

    dense_ppl = {d: metrics(dense, d) for d in domains}
    rows = []  # (method, target, label, domain) -> ratios
    results: dict = {}
    variants = ([("plain", False, 0.01)] if not args.no_plain else []) + \
        [(f"refit@{dm:g}" if len(damps) > 1 else "refit", True, dm) for dm in damps]
    for target in targets:
        for spec_name in methods:
            method, *opts = spec_name.split("+")
            for label, reconstruct, damp in (variants if method != "default" else [("job", True, 0.0)]):
                if ("seq" in opts or "stream" in opts) and not reconstruct:
                    continue
                key = f"{spec_name}/{label}/{target:g}"
                results[key] = {}
                for d in domains:
                    # `default`: exactly what a job gets from PruneConfig's defaults at this target.
                    gw = next((float(o[1:]) for o in opts if o[:1] == "g" and o[1:].replace(".", "").isdigit()), 0.0)
                    cfg = PruneConfig(target=target) if method == "default" else PruneConfig(method=method,
                                      general_weight=gw, target=target, reconstruct=reconstruct, damp=damp,
                                      allocate=any(o.startswith("alloc") for o in opts),
                                      verify=0 if "alloc0" in opts else 4,
                                      sequential="seq" in opts or "stream" in opts,
                                      refit_target="stream" if "stream" in opts and reconstruct else "layer",
                                      q_heads=next((int(o[1:]) for o in opts if o[:1] == "q" and o[1:].isdigit()), 0),
                                      kv_groups=next((int(o[2:]) for o in opts if o[:2] == "kv"), 0),
                                      stream_damp=next((float(o[2:]) for o in opts if o[:2] == "sd"),
                                                       PruneConfig.stream_damp),
                                      stream_attn="sa0" not in opts and ("sa" in opts or PruneConfig.stream_attn))
                    t1 = time.time()
                    if cfg.sequential:
                        # General text rides along, its sums weighted to general_weight x the domain's token mass.
                        runners = [sequential.LayerRunner(dense, calib[d], args.batch, general,
                                                          cfg.general_weight * calib[d].numel() / general.numel())]
                        plan, weights = sequential.prune_sequential(
                            dense, runners, cfg, domain=d,
                            on_layer=lambda i, d=d, t1=t1: print(
                                f"[bench] {d}: layer {i + 1} pruned ({time.time() - t1:.0f}s)", flush=True)
                            if (i + 1) % 5 == 0 else None)
                    else:
                        prof = S.mix(profiles[d], general_profile, cfg.general_weight) if cfg.general_weight \
                            else profiles[d]
                        plan = P.build_plan(prof, dense, cfg, domain=d, other_profiles=profiles,
                                            grad_stats=grads[d], verify_blocks=valid[d],
                                            log=lambda line, d=d: print(f"[bench] {d}: {line}", flush=True))
                        weights = refit.compensation(dense, plan, prof) if cfg.reconstruct else None
                    small = SL.slim(dense, plan, weights)
                    assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
                    ppl = metrics(small, d)
                    results[key][d] = {kind: ppl[kind] / dense_ppl[d][kind] for kind in ppl}
                    results[key][d]["removed"] = P.removed_fraction(plan)
                    results[key][d]["shape"] = {"mlp": plan.mlp_width, "kv": plan.kv_width or plan.kv_groups,
                                                "q_per_group": plan.q_width, "dropped": len(plan.dropped_layers)}
                    results[key][d]["seconds_plan_slim"] = round(time.time() - t1, 1)
                    del small
                    results[key][d]["worst"] = max(v for k, v in results[key][d].items()
                                                   if k in texts[d] and k != "heldout")
                rows.append(key)
                print(f"[bench] {key}: " + ", ".join(f"{d} worst {results[key][d]['worst']:.3f} held-out "
                                                     f"{results[key][d]['heldout']:.3f}" for d in domains)
                      + f" ({time.time() - t0:.0f}s)", flush=True)

    for d in domains:
        kinds = list(texts[d])
        print(f"\n{args.model} -> {d}, no training; perplexity / dense ({args.max_blocks} blocks x {args.block_size} "
              "per text); dense: " + ", ".join(f"{k} {dense_ppl[d][k]:.2f}" for k in kinds))
        print(f"{'variant':<30}{'removed':>8}" + "".join(f"{k[:18]:>19}" for k in kinds) + f"{'worst other':>12}")
        for key in rows:
            r = results[key][d]
            print(f"{key:<30}{r['removed']:>8.1%}" + "".join(f"{r[k]:>19.3f}" for k in kinds) + f"{r['worst']:>12.3f}")
    print(json.dumps({**figures(results, rows, targets, domains, texts), "dense_ppl": dense_ppl,
                      "results": results}))
    print(f"[bench] {time.time() - t0:.0f}s", file=sys.stderr)


def figures(results: dict, rows: list[str], targets: list[float], domains: list[str], texts: dict) -> dict:
    """The JSON figures, named for what they are: per target (pct) and domain, `best_<pct>_<d>` the lowest worst-case
    ratio over the out-of-source texts of any variant (`best_method_...` which), `best_heldout_...` the same on the
    held-out split; the job default's ratio per text (`default_<pct>_<d>_<text>`) and its worst (`worst_<pct>_<d>`),
    plain contextual's (`contextual_..._<text>`, `baseline_worst_<pct>_<d>`), and `noharm_<pct>_<d>`: the default no
    worse than plain contextual on every out-of-source text."""
    out: dict = {}
    for target in targets:
        pct = round(target * 100)
        at = [k for k in rows if k.endswith(f"/{target:g}")]
        for d in domains:
            other = [k for k in texts[d] if k != "heldout"]
            for kind, tag in (("worst", ""), ("heldout", "heldout_")):
                best = min(at, key=lambda k: results[k][d][kind])
                out[f"best_{tag}{pct}_{d}"] = round(results[best][d][kind], 3)
                out[f"best_method_{tag}{pct}_{d}"] = best.rsplit("/", 1)[0]
            default, base = f"default/job/{target:g}", f"contextual/plain/{target:g}"
            for name, key in (("default", default), ("contextual", base)):
                if key in results:
                    out.update({f"{name}_{pct}_{d}_{k}": round(results[key][d][k], 3) for k in other})
            if default in results:
                out[f"worst_{pct}_{d}"] = round(results[default][d]["worst"], 3)
            if base in results:
                out[f"baseline_worst_{pct}_{d}"] = round(results[base][d]["worst"], 3)
            if default in results and base in results:
                out[f"noharm_{pct}_{d}"] = all(results[default][d][k] <= results[base][d][k] for k in other)
    return out


if __name__ == "__main__":
    main()
