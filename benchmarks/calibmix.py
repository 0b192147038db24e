"""Calibration data against unseen forms: does calibrating a domain on more varied text of it keep the forms it
never read? And how far could calibration data alone go?

The demo's experts are cut on one source per domain (licences, HPO's one-line definitions, the standard library)
and lose most on text of the domain's other forms (bar-exam and clinical vignettes, abstracts). For each demo domain
the job default (PruneConfig at the target, FLAP + layer-by-layer refit + the model's own text at a quarter of the
domain's mass), no training, is calibrated on `--calib-tokens` tokens of:
  own       the job's calibration source alone (the demo's set-up);
  mix-X     the calibration source and every other text of the domain's suite except X, in equal token shares
            (leave one out: X is the one form never read);
  only-X    X's own documents outside those it is scored on: an oracle that calibrates on the very form scored,
            the bound of what calibration data can do for X at this cut.
Every variant is scored on every text of the suite (the documents benchmarks/othertext.py takes, which never
calibrate; documents of a text's source calibrate only when they are not among them) and on the own source's
held-out split. Figures are perplexity / dense on the same text.

Prints a table per domain, then one line of JSON: per domain and other-form text X `own_<d>_<X>`, `mix_<d>_<X>` (X
unseen), `only_<d>_<X>` (the oracle) and `mix_vs_own_<d>_<X>`.

`--recover` asks the same of training instead: the demo's pruned experts (`--run-dir`, 25% removed, made by `make
demo`) are fine-tuned with the demo's recovery budget and schedule (`--train-tokens` in batches of 4 blocks, lr
1.5e-4 with 2 warm-up steps and a cosine to a tenth, gradient clip 1, AdamW), on next-token cross-entropy alone (no
teacher), on the same three kinds of text (own: the demo's train split), and scored the same way. Keys
`recover_<own|mix|only>_<d>_<X>` and `recover_pruned_<d>_<X>`.

Usage: .venv/bin/python benchmarks/calibmix.py [--target 0.2] [--domains legal,medical,code] [--variants own,mix,only]
       .venv/bin/python benchmarks/calibmix.py --recover [--run-dir runs/demo] [--train-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import othertext  # noqa: E402

from minigpt import corpora, general as G, packaged, sequential, slim as SL  # noqa: E402
from minigpt.config import DataConfig, DomainConfig, ModelConfig, PruneConfig, SourceConfig  # noqa: E402
from minigpt.losses import lr_factor, next_token_loss  # noqa: E402
from minigpt.metrics import lm_metrics  # noqa: E402
from minigpt.models import load_model, load_tokenizer, resolve  # noqa: E402
from minigpt.sources import iter_documents  # noqa: E402

# The suite text of the calibration source's own form: packaged.DOMAINS lists it first (spdx, mondo, pypi-code).
SAME_FORM = {d: kinds[0] for d, kinds in packaged.DOMAINS.items()}
BLOCK = 256  # tokens per block, as the demo


def source_blocks(kind: str, exclude: list[str], tokens: int, tok, block_size: int) -> torch.Tensor:
    """[n, block_size] calibration blocks of suite text `kind`, from its documents outside `exclude` (those scored)."""
    scored = set(exclude)
    docs = [(corpora.doc_hash(t, "calibmix"), t) for t in iter_documents(SourceConfig(kind=kind), othertext.DOC_CHARS)
            if t not in scored]
    stream = corpora.build_stream(sorted(docs), tok, block_size, tokens)
    return torch.from_numpy(stream.ids.astype("int64")).view(-1, block_size)


def text_sets(d: str, own: torch.Tensor, suite: dict[str, list[str]], tokens: int, variants: set[str],
              only_texts: str, tok, bs: int) -> dict[str, torch.Tensor]:
    """The blocks of each variant of domain `d` (module docstring): `own` (the own source's blocks), and per
    other-form text X of the suite `mix-X` (every other text but X, equal shares) and `only-X`, `tokens` each."""
    def blocks_of(kind: str, n_tokens: int) -> torch.Tensor:
        n = -(-n_tokens // bs)
        return own[:n] if kind == othertext.DOMAINS[d] else source_blocks(kind, suite[kind], n_tokens, tok, bs)[:n]

    kinds = [othertext.DOMAINS[d], *suite]  # every source a mix may draw on
    out = {"own": own[: -(-tokens // bs)]} if "own" in variants else {}
    for x in [k for k in suite if k != SAME_FORM[d] and (not only_texts or k in only_texts.split(","))]:
        rest = [k for k in kinds if k != x]
        if "mix" in variants:
            out[f"mix-{x}"] = torch.cat([blocks_of(k, tokens // len(rest)) for k in rest])
        if "only" in variants:
            out[f"only-{x}"] = blocks_of(x, tokens)
    return out


def ppl_ratios(model, tok, texts: dict[str, list[str]], args, dense_ppl: dict[str, float] | None = None) -> dict:
    """Perplexity of `model` on each text (the first --max-blocks blocks), divided by `dense_ppl` when given."""
    with torch.inference_mode():
        return {k: lm_metrics(model, tok, t, BLOCK, args.batch, max_blocks=args.max_blocks)["ppl"]
                / (dense_ppl[k] if dense_ppl else 1.0) for k, t in texts.items()}


def figures(results: dict, tags: tuple[str, ...], prefix: str = "") -> dict:
    """The JSON keys: `<prefix><tag>_<d>_<X>` for every other-form text X (tags `own` / `pruned` name one model per
    domain, `mix` / `only` the model of X), and `mix_vs_own_<d>_<X>` where both were measured."""
    out: dict = {}
    for d, r in results.items():
        for x in [k for k in r["dense_ppl"] if k not in ("heldout", SAME_FORM[d])]:
            for tag in tags:
                name = tag if tag in ("own", "pruned") else f"{tag}-{x}"
                if name in r:
                    out[f"{prefix}{tag}_{d}_{x}"] = round(r[name][x], 3)
            if not prefix and "own" in r and f"mix-{x}" in r:
                out[f"mix_vs_own_{d}_{x}"] = round(r[f"mix-{x}"][x] / r["own"][x], 3)
    return out


def fine_tune(model, blocks: torch.Tensor, batch: int, lr: float = 1.5e-4, warmup: int = 2) -> None:
    """The demo's recovery schedule on `blocks` in order, next-token cross-entropy alone (in place)."""
    steps = -(-len(blocks) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps, 0.1)
        ids = blocks[step * batch:(step + 1) * batch]
        loss = next_token_loss(model(ids).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def recover_bound(args, dense, tok, bs: int) -> dict:
    """The `--recover` part (module docstring): per domain, the pruned expert and its fine-tunes on each text."""
    results: dict = {}
    for d in [x for x in args.domains.split(",") if x]:
        data = corpora.DomainData.load(Path(args.run_dir) / "data" / d)
        pruned_dir = Path(args.run_dir) / "experts" / d / "pruned"
        suite = othertext.suite(d)
        texts = {"heldout": [t for _, t in data.documents("heldout")], **suite}
        train = {"pruned": None, **text_sets(d, corpora.read_blocks(data.shards("train")), suite, args.train_tokens,
                                             {"own", "mix", "only"}, args.texts, tok, bs)}
        dense_ppl = ppl_ratios(dense, tok, texts, args)
        results[d] = {"dense_ppl": dense_ppl}
        for name, blocks in train.items():
            t1 = time.time()
            if blocks is not None and len(blocks) < 8:
                print(f"[calibmix] {d} recover {name}: skipped, only {len(blocks)} blocks of text", flush=True)
                continue
            model = load_model(pruned_dir)
            if blocks is not None:
                # Shuffled once, seeded: batches mix the sources of a mix as a recovery's permutation does.
                fine_tune(model, blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))],
                          args.batch)
            results[d][name] = ppl_ratios(model, tok, texts, args, dense_ppl)
            del model
            print(f"[calibmix] {d} recover {name} ({0 if blocks is None else len(blocks)} blocks, "
                  f"{time.time() - t1:.0f}s): " + ", ".join(f"{k} {v:.3f}" for k, v in results[d][name].items()),
                  flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--domains", default=",".join(othertext.DOMAINS))
    ap.add_argument("--variants", default="own,mix,only")
    ap.add_argument("--texts", default="", help="only these other-form texts as X (default: every one)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--max-blocks", type=int, default=16, help="blocks of each evaluation text")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", default="runs/bench-calibmix")
    ap.add_argument("--recover", action="store_true", help="fine-tune the demo's pruned experts instead")
    ap.add_argument("--run-dir", default="runs/demo", help="--recover: a finished demo run")
    ap.add_argument("--train-tokens", type=int, default=8192, help="--recover: tokens per fine-tune")
    args = ap.parse_args()
    t0, bs, work = time.time(), BLOCK, Path(args.work)
    variants = set(args.variants.split(","))
    folder = resolve(ModelConfig(source="smollm2-135m"))
    dense, tok = load_model(folder), load_tokenizer(folder)
    if args.recover:
        results = recover_bound(args, dense, tok, bs)
        print(f"[calibmix] {time.time() - t0:.0f}s", file=sys.stderr)
        print(json.dumps({**figures(results, ("pruned", "own", "mix", "only"), "recover_"), "results": results}))
        return
    gen_path = work / "general-8192.pt"
    if not gen_path.is_file():
        gen_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(G.sample_blocks(dense, tok, 8192 // bs, bs, seed=0), gen_path)
    general = torch.load(gen_path)
    cfg = PruneConfig(target=args.target)
    data_cfg = DataConfig(block_size=bs, calib_tokens=args.calib_tokens, heldout_tokens=4096, train_tokens=256,
                          calib_fraction=0.5, heldout_fraction=0.2)

    results: dict = {}
    for d in [x for x in args.domains.split(",") if x]:
        own_dir = work / "data" / f"{d}-{args.calib_tokens}"
        try:
            data = corpora.DomainData.load(own_dir)
        except FileNotFoundError:
            data = corpora.prepare_domain(DomainConfig(d, (SourceConfig(kind=othertext.DOMAINS[d]),)), data_cfg,
                                          tok, own_dir)
        suite = othertext.suite(d)
        texts = {"heldout": [t for _, t in data.documents("heldout")], **suite}
        calib = text_sets(d, corpora.read_blocks(data.shards("calib")), suite, args.calib_tokens, variants, args.texts,
                          tok, bs)
        dense_ppl = ppl_ratios(dense, tok, texts, args)
        results[d] = {"dense_ppl": dense_ppl}
        for name, blocks in list(calib.items()):
            t1 = time.time()
            if len(blocks) < 8:  # pmc-articles: its five articles are nearly all among the scored documents
                print(f"[calibmix] {d} {name}: skipped, only {len(blocks)} blocks of text to calibrate on", flush=True)
                del calib[name]
                continue
            runner = sequential.LayerRunner(dense, blocks, args.batch, general,
                                            cfg.general_weight * blocks.numel() / general.numel())
            plan, weights = sequential.prune_sequential(dense, [runner], cfg, domain=d)
            small = SL.slim(dense, plan, weights)
            results[d][name] = ppl_ratios(small, tok, texts, args, dense_ppl)
            del small, runner
            print(f"[calibmix] {d} {name} ({blocks.shape[0]} blocks, {time.time() - t1:.0f}s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in results[d][name].items()), flush=True)
        print(f"\n{d}, {args.target:.0%} removed, no training; perplexity / dense")
        print(f"{'calibrated on':<28}" + "".join(f"{k[:18]:>19}" for k in texts))
        for name in calib:
            print(f"{name:<28}" + "".join(f"{results[d][name][k]:>19.3f}" for k in texts))

    print(f"[calibmix] {time.time() - t0:.0f}s", file=sys.stderr)
    print(json.dumps({**figures(results, ("own", "mix", "only")), "results": results}))


if __name__ == "__main__":
    main()
