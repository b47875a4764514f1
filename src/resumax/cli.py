"""The `resumax` command: `inspect` prints what a set of ArrayRecord files holds; `train` runs the
reference training loop from a YAML config with `key=value` overrides."""

from __future__ import annotations

import argparse
import json
import sys

from resumax.errors import ResumaxError
from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule


def _inspect(args: argparse.Namespace) -> int:
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), args.paths)
    first = source[0]
    fields = {
        key: {
            "dtype": str(getattr(value, "dtype", type(value).__name__)),
            "shape": list(getattr(value, "shape", ())),
        }
        for key, value in first.items()
    }
    summary = {
        "files": len(source.paths),
        "records": len(source),
        "fingerprint": source.fingerprint,
        "fields": fields,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from resumax.config import load_config
    from resumax.train import train

    train(load_config(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resumax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise ArrayRecord files (paths or globs)")
    inspect.add_argument("paths", nargs="+")
    inspect.set_defaults(run=_inspect)
    train = commands.add_parser(
        "train",
        help="train from a YAML config; resumes the latest checkpoint; SIGTERM saves and exits",
    )
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/digits.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_steps=500")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ResumaxError as error:
        print(f"resumax {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
