"""Command line: `minigpt run JOB.yaml [key=value ...]`, `minigpt status RUN_DIR`, `minigpt export EXPERT --gguf f16`,
`minigpt prepare-model ALIAS`.

User errors (bad job file, missing data, impossible resources) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt.config import ConfigError
from minigpt import card as CA, export as EX, jobfile as J, licence as LI
from minigpt.config import ModelConfig
from minigpt.io import atomic_write_json, atomic_write_text
from minigpt.models import resolve
from minigpt.pipeline import JobIncomplete, Pipeline, run_job, status


def _cmd_run(args) -> int:
    cfg = J.load(args.job, args.overrides)
    run_job(cfg, until=args.until)
    return 0


def _cmd_validate(args) -> int:
    cfg = J.load(args.job, args.overrides)
    Pipeline(cfg).validate()
    print(f"{args.job}: ok ({len(cfg.domains)} domain(s), output {cfg.output_dir})")
    return 0


def _cmd_status(args) -> int:
    rows = status(Path(args.run_dir))
    if not rows:
        print(f"{args.run_dir}: no stages recorded")
        return 1
    for r in rows:
        where = f"{r['stage']}/{r['domain']}" if r["domain"] else r["stage"]
        err = f"  ({r['error'].splitlines()[0][:120]})" if r.get("error") else ""
        print(f"{where:<28}{r['status']}{err}")
    return 0


def _cmd_prepare_model(args) -> int:
    print(resolve(ModelConfig(source=args.model)))
    return 0


def _cmd_export(args) -> int:
    src = Path(args.expert)
    types = list(dict.fromkeys(args.gguf or ["f16"]))
    EX.read_config(src)  # not an expert, or an architecture it cannot export: one line, nothing written
    out = Path(args.out) if args.out else EX.default_out(src)
    files = []
    for t in types:
        files.append(EX.export_gguf(src, out / EX.file_name(src, t), t))
        print(f"{out / files[-1]['file']}: {files[-1]['bytes'] / 1e6:.1f} MB, {t}", flush=True)
    failed = False
    if not args.no_verify:
        blocks = EX.probe_blocks(src)
        for f, v in zip(files, EX.verify(src, [out / f["file"] for f in files], blocks)):
            f["verify"] = v
            print(f"{f['file']}: " + (v.get("skipped") or f"read back with transformers: logits within "
                                      f"{v['max_abs_logit_diff']:.3g} of the expert's "
                                      f"(largest {v['max_abs_logit']:.3g}), "
                                      f"perplexity {v['ppl_ratio']:.4f}x the expert's on a probe text"), flush=True)
            bad = EX.problem(f)
            if bad:
                failed |= bad[0]
                print(f"minigpt: {'error' if bad[0] else 'warning'}: {bad[1]}", file=sys.stderr)
    # The folder of GGUF files ships like the expert: its terms files and its card, with the files listed.
    for f in LI.terms_files(src):
        atomic_write_text(out / f.name, f.read_text(errors="replace"))
    card = src / "README.md"
    if card.is_file():
        atomic_write_text(out / "README.md", CA.with_gguf(card.read_text(), files))
    else:
        print(f"note: {src} has no model card (README.md): the GGUF folder has none either", flush=True)
    # What was exported from what, with the checks; in a run folder the job rewrites this folder's card from it.
    atomic_write_json(out / "export.json", {"kind": src.name, "source": str(src.resolve()), "files": files})
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minigpt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job (resumes a finished or interrupted run folder)")
    r.add_argument("job")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.target=0.3")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage (e.g. slim: prune without recovering)")
    r.set_defaults(fn=_cmd_run)
    v = sub.add_parser("validate", help="check a job file and its inputs without running anything")
    v.add_argument("job")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_validate)
    s = sub.add_parser("status", help="show each stage and domain of a run folder")
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_status)
    e = sub.add_parser("export", help="write an expert as GGUF files (llama.cpp), with its card and terms files")
    e.add_argument("expert", help="an expert folder (e.g. runs/demo/experts/legal/recovered)")
    e.add_argument("--gguf", action="append", choices=["f16", "q8_0"], metavar="TYPE",
                   help="f16 (default) or q8_0; repeat for both")
    e.add_argument("--out", metavar="DIR", help="output folder (default: experts/<domain>/gguf in a run folder, "
                   "else EXPERT-gguf)")
    e.add_argument("--no-verify", action="store_true", help="do not read the files back with transformers")
    e.set_defaults(fn=_cmd_export)
    m = sub.add_parser("prepare-model", help="prepare a built-in model alias offline and print its folder")
    m.add_argument("model")
    m.set_defaults(fn=_cmd_prepare_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"minigpt: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not isinstance(e, JobIncomplete):
            raise
        print(f"minigpt: incomplete: {e} (other domains finished; re-run to retry)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minigpt: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
