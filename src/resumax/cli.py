"""The `resumax` command: `inspect` prints what a set of ArrayRecord files (resumax or
tf.train.Example records) or a TFDS dataset directory holds, `convert` writes
an .npz file's rows as ArrayRecord shards, and `train` runs the reference training loop from a
YAML config with `key=value` overrides."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from resumax import records, summary
from resumax.errors import DataSourceError, ResumaxError


def _inspect(args: argparse.Namespace) -> int:
    print(json.dumps(summary.describe(args.paths), indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    try:
        with np.load(args.npz, allow_pickle=False) as arrays:
            columns = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as error:
        raise DataSourceError(f"cannot read {args.npz!r} as an .npz of arrays: {error}") from error
    rows = records.ArrayRows(columns)
    paths = records.write_shards(args.prefix, rows, args.shards)
    print(f"wrote {len(rows)} records with fields {sorted(columns)} to {len(paths)} files:")
    for path in paths:
        print(f"  {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from resumax.train.config import load_config
    from resumax.train.loop import train

    train(load_config(args.config, args.overrides))
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resumax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="summarise ArrayRecord files (paths or globs) or a TFDS dataset directory"
    )
    inspect.add_argument("paths", nargs="+")
    inspect.set_defaults(run=_inspect)
    convert = commands.add_parser(
        "convert", help="write the rows of an .npz file's arrays as ArrayRecord shards"
    )
    convert.add_argument("npz", help="an .npz whose arrays all have one row per record")
    convert.add_argument("prefix", help="output prefix: PREFIX-00000-of-0000N.array_record")
    convert.add_argument("--shards", type=_positive_int, default=1, help="number of files")
    convert.set_defaults(run=_convert)
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
