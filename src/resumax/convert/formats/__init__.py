"""The input formats of `resumax convert`, one module each, and the reader for a format name."""

from __future__ import annotations

from resumax.convert.formats.base import Item, Reader
from resumax.convert.options import ConvertOptions
from resumax.records import storage


def reader_for(options: ConvertOptions, storage_options: storage.StorageOptions = None) -> Reader:
    """A reader of `options.format` (its module imported only when used)."""
    if options.format == "jsonl":
        from resumax.convert.formats.jsonl import JsonLinesReader as cls
    elif options.format == "csv":
        from resumax.convert.formats.csv import CsvReader as cls
    elif options.format == "parquet":
        from resumax.convert.formats.parquet import ParquetReader as cls
    elif options.format == "tfrecord":
        from resumax.convert.formats.tfrecord import TFRecordReader as cls
    elif options.format == "imagefolder":
        from resumax.convert.formats.imagefolder import ImageFolderReader as cls
    elif options.format == "hf":
        from resumax.convert.formats.hf import HuggingFaceReader as cls
    else:
        from resumax.convert.formats.npz import NpzReader as cls
    return cls(options, storage_options)


__all__ = ["Item", "Reader", "reader_for"]
