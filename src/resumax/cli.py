"""The `resumax` command: `inspect` prints what a set of ArrayRecord files (resumax or
tf.train.Example records) or a TFDS dataset directory holds, `convert` writes JSON Lines,
Parquet, CSV, TFRecord, image folder, Hugging Face or .npz inputs as ArrayRecord shards, `index`
writes the shard index of a set made by other tools, `profile` shows where a pipeline's time
goes, `train` runs the reference training loop from a YAML config with `key=value` overrides
(and rewinds it past bad data), and `state` / `batches` name the records a run's steps read."""

from __future__ import annotations

import argparse
import json
import os
import sys

from resumax.convert import cli as convert_cli
from resumax.errors import CheckpointError, ConfigError, ResumaxError
from resumax.records import indexing


def _inspect(args: argparse.Namespace) -> int:
    from resumax.tools import summary

    print(json.dumps(summary.describe(args.paths, args.storage_options), indent=2))
    return 0


def _index(args: argparse.Namespace) -> int:
    written = indexing.index_set(args.pattern, storage_options=args.storage_options)
    print(
        f"wrote {written.index} ({written.num_files} files, {written.num_records} records): "
        "sources read it instead of opening the files"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    """Exit status 0: finished, or saved and stopped by SIGTERM; 130: saved and stopped by
    Ctrl-C; 2: an error (ConfigError, CheckpointError, NonFiniteLossError, ...)."""
    from resumax.train.config import load_config
    from resumax.train.loop import train
    from resumax.train.preemption import INTERRUPTED_EXIT_STATUS, ignore_stop_signals_until_exit

    if (args.rewind_to is None) != (args.skip_batches is None):
        raise ConfigError("--rewind-to STEP and --skip-batches K go together; give both")
    rewind = None if args.rewind_to is None else (args.rewind_to, args.skip_batches)
    try:
        result = train(load_config(args.config, args.overrides), rewind=rewind)
    except (CheckpointError, KeyboardInterrupt) as error:
        # A failed or aborted save can leave Orbax's threads waiting for a commit that never
        # comes, which would block the interpreter's exit: report and end the process now.
        aborted = isinstance(error, KeyboardInterrupt)
        reason = "aborted (Ctrl-C)" if aborted else f"{type(error).__name__}: {error}"
        print(f"resumax train: {reason}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT_STATUS if aborted else 2)
    if result.preempted:
        ignore_stop_signals_until_exit()
    return INTERRUPTED_EXIT_STATUS if result.interrupted else 0


def _state(args: argparse.Namespace) -> int:
    from resumax.train.data_commands import state_command

    print(state_command(args.path, args.step, args.json))
    return 0


def _batches(args: argparse.Namespace) -> int:
    from resumax.train.config import load_config
    from resumax.train.data_commands import batches_command

    config = load_config(args.config, args.overrides)
    print(batches_command(config, args.step, args.count, args.json, args.show))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from resumax.pipeline import Pipeline
    from resumax.profile import profile_pipeline
    from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule

    if args.config:
        for flag, value, key in (
            ("--storage-options", args.storage_options, "data.storage_options.endpoint_url=..."),
            ("--shuffle-window", args.shuffle_window, "data.shuffle_window=..."),
            ("--cache-limit", args.cache_limit, "data.cache_limit=..."),
        ):
            if value is not None:
                raise ConfigError(
                    f"with --config, give {flag} as an override of the config, e.g. {key}; "
                    f"{flag} is for paths"
                )
        from resumax.train import distributed
        from resumax.train.config import load_config
        from resumax.train.loop import make_task, prepare_task_data

        task = make_task(load_config(args.config, args.targets))
        prepare_task_data(task)
        mesh = distributed.data_parallel_mesh()
        pipeline = task.build_pipeline(distributed.pipeline_sharding(mesh))
    elif args.targets:
        config = ArrayRecordSourceConfig(shuffle_files=True, shuffle_window=args.shuffle_window)
        options = {"storage_options": args.storage_options, "cache_limit": args.cache_limit}
        source = ArrayRecordSourceModule(config, args.targets, **options)
        pipeline = Pipeline(source, batch_size=args.batch_size)
    else:
        raise ConfigError("give ArrayRecord paths or globs, or --config CONFIG.yaml")
    print(profile_pipeline(pipeline, seconds=args.seconds).format())
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return int(text)


def _storage_options(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        type=_storage_options,
        default=None,
        metavar="JSON",
        help="fsspec options for URLs as a JSON object, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\' (credentials otherwise come from the '
        "environment, as each storage library finds them)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resumax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="summarise ArrayRecord files (paths or globs) or a TFDS dataset directory"
    )
    inspect.add_argument("paths", nargs="+")
    _add_storage_options(inspect)
    inspect.set_defaults(run=_inspect)
    convert_cli.add_parser(commands, _add_storage_options)
    index = commands.add_parser(
        "index",
        help="write the shard index (PREFIX.index.json) of an existing set made by other tools "
        "(TFDS, Grain, ...), local or in a bucket, so that sources need not open its files",
    )
    index.add_argument(
        "pattern",
        help="a path or glob (or s3:// / gs:// URL) matching exactly one complete "
        "-NNNNN-of-MMMMM shard set, e.g. 'data/mnist-train.array_record-*'",
    )
    _add_storage_options(index)
    index.set_defaults(run=_index)
    profile = commands.add_parser(
        "profile",
        help="time each step of the input pipeline and num_workers 0..cores; recommend a setting",
    )
    profile.add_argument(
        "targets",
        nargs="*",
        help="ArrayRecord paths or globs; with --config, key=value overrides of the config",
    )
    profile.add_argument("--config", help="profile a training config's pipeline instead")
    profile.add_argument("--batch-size", type=_positive_int, default=256, help="for paths")
    profile.add_argument(
        "--seconds", type=_positive_float, default=2.0, help="duration of each measurement"
    )
    profile.add_argument(
        "--shuffle-window",
        type=_positive_int,
        metavar="RECORDS",
        help="for paths: shuffle records within windows of this many (read file by file; a "
        "set in a bucket then needs only a few windows' shards in the cache)",
    )
    profile.add_argument(
        "--cache-limit",
        metavar="BYTES",
        help="for URL paths: the shard cache's limit, e.g. 20GB (default 80%% of free disk)",
    )
    _add_storage_options(profile)
    profile.set_defaults(run=_profile)
    train = commands.add_parser(
        "train",
        help="train from a YAML config; resumes the latest checkpoint; SIGTERM or Ctrl-C saves "
        "and exits (status 0 or 130; 2 on errors)",
    )
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/digits.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_steps=500")
    train.add_argument(
        "--rewind-to",
        type=_non_negative_int,
        metavar="STEP",
        help="restore the newest checkpoint at or before STEP, set later checkpoints and metrics "
        "aside in <run_dir>/abandoned/, and (with --skip-batches) skip batches; once",
    )
    train.add_argument("--skip-batches", type=_non_negative_int, metavar="K")
    train.set_defaults(run=_train)
    state = commands.add_parser(
        "state",
        help="print the data state saved in a run's checkpoint: dataset, position, skips, the "
        "records of the next batch (reads no model)",
    )
    state.add_argument("path", help="a run directory or its checkpoint directory")
    state.add_argument("--step", type=_non_negative_int, help="default: the latest step")
    state.add_argument("--json", action="store_true", help="one JSON object")
    state.set_defaults(run=_state)
    batches = commands.add_parser(
        "batches",
        help="print the records that training steps N..N+K-1 of a config's run train on",
    )
    batches.add_argument("--config", required=True, help="YAML file of the run")
    batches.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    batches.add_argument("--step", type=_positive_int, required=True, metavar="N")
    batches.add_argument("--count", type=_positive_int, default=1, metavar="K")
    batches.add_argument("--json", action="store_true", help="a JSON list of {step, rows}")
    batches.add_argument(
        "--show", action="store_true", help="decode the records: fields, shapes, a preview"
    )
    batches.set_defaults(run=_batches)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, pipeline_options = convert_cli.split_pipeline_options(
        sys.argv[1:] if argv is None else argv
    )
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`train --config C --rewind-to 5 k=v`).
    if extra and hasattr(args, "overrides") and all("=" in e[1:] for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pipeline_options = pipeline_options
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader of stdout left (`resumax batches ... | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ResumaxError as error:
        print(f"resumax {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
