"""`convert`: inputs of any supported format to an ArrayRecord shard set with its index, on the
local engine or on Apache Beam, to a local prefix or a URL."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

from resumax.convert import inputs as input_files
from resumax.convert.formats import Reader, reader_for
from resumax.convert.local import progress_bar, write_local
from resumax.convert.options import ConvertOptions
from resumax.convert.plan import Plan, make_plan
from resumax.convert.shards import staging_prefix
from resumax.errors import ConfigError
from resumax.records import remote, shard_index, storage
from resumax.records.writers import shard_paths

ENGINES = ("local", "beam")


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert` wrote: the shard paths (or URLs), the index, and the plan it followed."""

    paths: list[str]
    index: str
    plan: Plan
    fields: list[str]  # the sorted field names of the first record

    @property
    def num_records(self) -> int:
        return self.plan.num_records


def convert(
    inputs: Sequence[str] | str,
    prefix: str,
    *,
    format: str | None = None,
    num_shards: int | None = None,
    shard_size: int | None = None,
    fields: Sequence[str] | None = None,
    fill_null: str | None = None,
    skip_bad: int = 0,
    features: dict | None = None,
    decode_images: bool = False,
    resume: bool = False,
    engine: str = "local",
    pipeline_options: Sequence[str] = (),
    storage_options: storage.StorageOptions = None,
    progress: bool = False,
) -> Conversion:
    """Converts `inputs` (files, globs, directories or URLs, taken in sorted order) to the shard
    set `prefix-NNNNN-of-MMMMM.array_record` and its index `prefix.index.json`.

    The records are cut into `num_shards` contiguous shards as `write_shards` cuts them (or as
    many as `shard_size` encoded bytes each need). `format` is guessed from the names when None;
    `fields`, `fill_null` (a JSON value), `skip_bad`, `features` (TFRecord) and `decode_images`
    (image folders) are described in `ConvertOptions`. The index metadata records the sources
    and these options, never the engine.

    `engine="beam"` runs the writing on Apache Beam with `pipeline_options` (e.g.
    `["--runner=FnApiRunner", "--direct_num_workers=2"]`); its files and index are
    byte-identical to the local engine's. `resume=True` keeps the shards an interrupted attempt
    completed (checked against the records this one would write) and writes the rest.

    A URL prefix is written in a local staging directory (kept across attempts for `resume`)
    and uploaded, the index last; on Beam each worker uploads the shards it writes, and the
    final step the index.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; use one of {ENGINES}")
    storage.check_storage_options(storage_options)
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    paths = [os.fsdecode(path) for path in paths]
    options = ConvertOptions(
        format=format or input_files.guess_format(paths, storage_options),
        fields=None if fields is None else tuple(fields),
        fill_null=fill_null,
        skip_bad=skip_bad,
        features=features,
        decode_images=decode_images,
        num_shards=num_shards,
        shard_size=shard_size,
    )
    reader = reader_for(options, storage_options)
    full_pass = options.needs_full_pass()
    bar = progress_bar(None, "plan (full pass)", progress and full_pass)
    plan = make_plan(reader, paths, bar.update if bar else None)
    if bar is not None:
        bar.close()
    prefix = os.fsdecode(prefix)
    fields = _fields(reader, plan)
    if engine == "beam":
        from resumax.convert.beam import write_beam

        written = write_beam(reader, plan, prefix, resume, list(pipeline_options), storage_options)
        return Conversion(written, shard_index.index_path(prefix), plan, fields)
    if not storage.is_url(prefix):
        written = write_local(reader, plan, storage.local_path(prefix), resume, progress)
        return Conversion(written, shard_index.index_path(storage.local_path(prefix)), plan, fields)
    target = staging_prefix(prefix)
    written = write_local(reader, plan, target, resume, progress)
    urls = shard_paths(prefix, plan.num_shards)
    index_url = shard_index.index_path(prefix)
    remote.upload_set(written, urls, index_url, storage_options)
    shutil.rmtree(os.path.dirname(target), ignore_errors=True)
    return Conversion(urls, index_url, plan, fields)


def _fields(reader: Reader, plan: Plan) -> list[str]:
    """The sorted field names of the first good record of the plan ([] when there is none)."""
    for unit in plan.units[:1]:
        for item in reader.read(unit):
            if isinstance(item, dict):
                return sorted(item)
    return []
