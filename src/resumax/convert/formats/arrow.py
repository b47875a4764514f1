"""Arrow tables (Parquet files, Hugging Face datasets) as records: each column a field, numbers
with their type's width (an int32 column gives np.int32), strings as str, binary as bytes, lists
as 1-D (or nested: N-D) arrays, dictionary columns decoded, and a struct with a `bytes` field
(a Hugging Face Image or Audio) as those bytes. Nulls are bad records naming the column, unless
`fill_null` replaces them (cast to the column's type)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from resumax.convert.options import ConvertOptions
from resumax.convert.values import BadRecord
from resumax.errors import ConfigError


def _pa():
    import pyarrow  # an optional extra: resumax[parquet]

    return pyarrow


def check_columns(schema: Any, options: ConvertOptions, where: str) -> list[str]:
    """The columns to read (`options.fields`, else all); ConfigError naming a missing one or
    one whose type has no record form."""
    names = list(options.fields) if options.fields is not None else list(schema.names)
    for name in names:
        if name not in schema.names:
            raise ConfigError(f"{where} has no column {name!r} (it has {schema.names})")
        _check_type(name, schema.field(name).type, where)
    return names


def _is_list(kind: Any) -> bool:
    types = _pa().types
    return types.is_list(kind) or types.is_large_list(kind) or types.is_fixed_size_list(kind)


def _check_type(name: str, kind: Any, where: str, in_list: bool = False) -> None:
    types = _pa().types
    if types.is_dictionary(kind):
        kind = kind.value_type
    if types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and not in_list:
        return
    if _is_list(kind):
        return _check_type(name, kind.value_type, where, in_list=True)
    if types.is_nested(kind) or types.is_dictionary(kind):
        raise ConfigError(
            f"column {name!r} of {where} has type {kind}, which has no record form (numbers, "
            "strings, binary and lists of them have one); leave it out with --fields"
        )
    return None


def _values(column: Any) -> list[Any]:
    """The Python/numpy values of one chunk-free column (None for nulls)."""
    pa = _pa()
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _values(column.dictionary_decode())
    if pa.types.is_struct(kind):
        return _values(column.field("bytes"))
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_temporal(kind)
    ):
        if column.null_count == 0:
            return list(column.to_numpy(zero_copy_only=False))
        dtype = np.dtype(kind.to_pandas_dtype())
        return [None if v is None else np.asarray(v, dtype).reshape(()) for v in column.to_pylist()]
    if _is_list(kind):
        return [None if v is None else _list(v) for v in column.to_pylist()]
    return column.to_pylist()


def _list(value: list) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "O":
        raise ValueError("a list holding nulls or ragged lists")
    return array


def _typed_list(column: Any) -> list[Any] | None:
    """A list column of numbers as arrays of the value type's width, fast (offsets into the
    flat values); None when it is not such a column."""
    pa = _pa()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return None
    value_type = kind.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        return None
    if column.values.null_count:
        return None
    offsets = column.offsets.to_numpy()
    flat = column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [
        flat[start:stop].copy() if ok else None
        for start, stop, ok in zip(offsets[:-1], offsets[1:], valid, strict=True)
    ]


def batch_records(
    batch: Any, names: list[str], options: ConvertOptions, where: Callable[[int], str]
) -> Iterator[dict[str, Any] | BadRecord]:
    """The records of a pyarrow RecordBatch (or Table), in row order; `where(row)` names a row
    of the batch for a BadRecord."""
    pa = _pa()
    columns = {}
    for name in names:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if column.null_count and options.fill_null is not None:
            fill = options.fill_value()
            try:
                column = pa.compute.fill_null(column, pa.scalar(fill).cast(column.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
                raise ConfigError(
                    f"--fill-null {options.fill_null} does not fit column {name!r} of type "
                    f"{column.type}: {error}"
                ) from error
        try:
            values = _typed_list(column)
            columns[name] = values if values is not None else _values(column)
        except ValueError as error:
            raise ConfigError(f"column {name!r} of {where(0)}: {error}") from error
    for row in range(batch.num_rows):
        record = {name: values[row] for name, values in columns.items()}
        nulls = [name for name, value in record.items() if value is None]
        if nulls:
            reason = f"field {nulls[0]!r} is null; give --fill-null VALUE to replace nulls"
            yield BadRecord(where(row), reason)
        else:
            yield record
