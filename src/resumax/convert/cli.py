"""`resumax convert INPUT... OUTPUT_PREFIX [options] [-- BEAM_PIPELINE_OPTIONS]`: the command
line of `resumax.convert.convert`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from resumax.convert.conversion import ENGINES, convert
from resumax.convert.options import FORMATS, parse_features, parse_size


def split_pipeline_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments, the Beam pipeline options after `--`) of a `convert` command line; other
    commands' arguments are left whole."""
    argv = list(argv)
    if "convert" in argv and "--" in argv[argv.index("convert") :]:
        split = argv.index("--", argv.index("convert"))
        return argv[:split], argv[split + 1 :]
    return argv, []


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return int(text)


def add_parser(commands: argparse._SubParsersAction, common: Callable) -> None:
    """Adds the `convert` command; `common(parser)` adds the options all commands share
    (--storage-options)."""
    convert_parser = commands.add_parser(
        "convert",
        help="write JSON Lines, Parquet, CSV, TFRecord, image folder, Hugging Face or .npz "
        "inputs as ArrayRecord shards with their index (local engine or Apache Beam)",
    )
    convert_parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="input files, globs or directories (or URLs)"
    )
    convert_parser.add_argument(
        "prefix",
        metavar="PREFIX",
        help="the output prefix, a path or URL: PREFIX-00000-of-0000N.array_record",
    )
    convert_parser.add_argument(
        "--format", choices=FORMATS, help="the input format; guessed from the names if left out"
    )
    shards = convert_parser.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=_positive, help="number of files (default 1)")
    shards.add_argument(
        "--shard-size", type=parse_size, help="target encoded size per file, e.g. 256MB"
    )
    convert_parser.add_argument(
        "--fields", type=lambda text: tuple(text.split(",")), help="keep only these, e.g. a,b"
    )
    convert_parser.add_argument(
        "--fill-null", metavar="JSON", help="replace nulls by this JSON value, e.g. 0 or '\"\"'"
    )
    convert_parser.add_argument(
        "--skip-bad",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="skip up to N malformed records (listed in the index metadata)",
    )
    convert_parser.add_argument(
        "--features",
        type=parse_features,
        metavar="JSON",
        help='TFRecord feature spec, e.g. \'{"image": ["bytes", []], "label": ["int64", []]}\'',
    )
    convert_parser.add_argument(
        "--decode-images", action="store_true", help="image folders: store uint8 arrays"
    )
    convert_parser.add_argument(
        "--resume", action="store_true", help="keep the shards an interrupted run completed"
    )
    convert_parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local, or beam (Beam pipeline options after --)",
    )
    convert_parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    common(convert_parser)
    convert_parser.set_defaults(run=run, pipeline_options=[])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    done = convert(
        args.inputs,
        args.prefix,
        format=args.format,
        num_shards=args.shards,
        shard_size=args.shard_size,
        fields=args.fields,
        fill_null=args.fill_null,
        skip_bad=args.skip_bad,
        features=args.features,
        decode_images=args.decode_images,
        resume=args.resume,
        engine=args.engine,
        pipeline_options=args.pipeline_options,
        storage_options=args.storage_options,
        progress=not args.no_progress,
    )
    skipped = done.plan.metadata["skipped"]
    print(f"wrote {done.num_records} records with fields {done.fields} to {len(done.paths)} files:")
    for path in done.paths:
        print(f"  {path}")
    print(f"and their index {done.index}")
    if skipped:
        print(f"skipped {len(skipped)} bad records (listed in the index metadata), e.g.:")
        for bad in skipped[:5]:
            print(f"  {bad['where']}: {bad['reason']}")
    return 0
