"""Command line: `minigpt run JOB.yaml [key=value ...]`, `minigpt status RUN_DIR`, `minigpt prepare-model ALIAS`.

User errors (bad job file, missing data, impossible resources) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt.config import ConfigError


def _cmd_run(args) -> int:
    from minigpt import config as C
    from minigpt.pipeline import run_job

    cfg = C.load(args.job, args.overrides)
    run_job(cfg, args.job, until=args.until)
    return 0


def _cmd_validate(args) -> int:
    from minigpt import config as C
    from minigpt.pipeline import Pipeline

    cfg = C.load(args.job, args.overrides)
    Pipeline(cfg).validate()
    print(f"{args.job}: ok ({len(cfg.domains)} domain(s), output {cfg.output_dir})")
    return 0


def _cmd_status(args) -> int:
    from minigpt.pipeline import status

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
    from minigpt.config import ModelConfig
    from minigpt.models import resolve

    print(resolve(ModelConfig(source=args.model)))
    return 0


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
        from minigpt.pipeline import JobIncomplete

        if not isinstance(e, JobIncomplete):
            raise
        print(f"minigpt: incomplete: {e} (other domains finished; re-run to retry)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minigpt: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
