"""Never silently wrong data: records whose fields, shapes or types differ, and stage results the
next step cannot use, are errors naming the field, the stage and the records (issue 11, 12).

Stage functions are module-level: workers receive them by reference.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from resumax import (
    ArrayRecordSourceConfig,
    ArrayRecordSourceModule,
    BatchMap,
    Pipeline,
    write_array_record,
)
from resumax.errors import ConfigError, StageError
from tests.conftest import make_examples, take

RECORDS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 records with the same fields: id, feature, image."""
    path = tmp_path_factory.mktemp("data") / "plain.array_record"
    write_array_record(path, make_examples(RECORDS))
    return str(path)


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """60 records; `weight` only on every 7th one (records 0, 7, 14, ...)."""
    path = tmp_path_factory.mktemp("data") / "weighted.array_record"
    examples = make_examples(RECORDS)
    for index in range(0, RECORDS, 7):
        examples[index]["weight"] = np.float32(0.5)
    write_array_record(path, examples)
    return str(path)


def build(path, stages=(), *, shuffle=False, seed=0, batch_size=8, **options):
    config = ArrayRecordSourceConfig(seed=seed, shuffle_files=shuffle)
    source = ArrayRecordSourceModule(config, path)
    return Pipeline(source, stages, batch_size=batch_size, **options)


def record_id(example):
    return int(example["id"])


# Stages (module level, for workers) -----------------------------------------------------------


def drop_weight_from_first_eight(example):
    """Records 0-7 keep `weight`, the rest lose it: whole batches differ, not records."""
    example = {**example, "weight": np.float32(1)}
    if record_id(example) >= 8:
        del example["weight"]
    return example


def ragged_tokens(example):
    return {"tokens": np.arange(record_id(example) % 5, dtype=np.int32)}


def int_or_float(example):
    return {"value": record_id(example) if record_id(example) % 3 else float(record_id(example))}


def float_then_int(example):
    return {"value": float(record_id(example)) if record_id(example) < 3 else record_id(example)}


def bool_or_int(example):
    return {"value": True if record_id(example) % 2 else 7}


def beyond_int64(example):
    return {"value": 2**63 if record_id(example) == 9 else record_id(example)}


def float32_or_float64(example):
    dtype = np.float64 if record_id(example) == 5 else np.float32
    return {"value": np.zeros(2, dtype)}


def nul_terminated(example):
    return {"value": f"r{record_id(example)}\x00"}


def exact_python_values(example):
    index = record_id(example)
    return {
        "big": 2**62 + index,
        "negative": -(2**63) + index,
        "ratio": index / 7,
        "flag": index % 2 == 0,
        "name": "r" * (index % 4 + 1),
        "pair": [index, index + 1],
    }


def forget_to_return(example):
    example["seen"] = True


def as_tuple(example):
    return (example["id"], example["feature"])


def stop_iteration_on_record_9(example):
    if record_id(example) == 9:
        raise StopIteration
    return example


def with_a_lock(example):
    return {**example, "lock": threading.Lock() if record_id(example) == 11 else None}


def batch_forget_to_return(batch):
    batch["seen"] = np.ones(len(batch["id"]))


def batch_with_python_float(batch):
    return {**batch, "mean": float(batch["feature"].mean())}


def batch_stop_iteration(batch):
    raise StopIteration


# 1. Records whose fields differ ----------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_field_on_some_records_raises_stage_error_naming_it_and_the_records_that_lack_it(
    weighted, num_workers
):
    pipeline = build(weighted, num_workers=num_workers)
    with pytest.raises(StageError) as raised:
        next(iter(pipeline))
    message = str(raised.value)
    assert "field 'weight'" in message
    # Records 0 and 7 have it; 1-6 lack it, named by record index and position.
    assert "records 1 (epoch 0, position 1), 2 (epoch 0, position 2)" in message
    assert "0 (epoch 0" not in message.split("lack it")[0].split("but")[1]


@pytest.mark.parametrize(
    ("seed", "batch_size", "num_workers", "prefetch"),
    [(0, 8, 0, 0), (1, 5, 0, 2), (2, 16, 2, 2), (3, 3, 2, 0), (4, 1, 0, 0), (5, 7, 1, 2)],
)
def test_the_field_policy_is_the_same_whatever_the_shuffle_and_chunk_boundaries(
    weighted, seed, batch_size, num_workers, prefetch
):
    # Every batch before the error has the same fields, the field is never dropped silently, and
    # the error comes within the first epoch.
    pipeline = build(
        weighted,
        shuffle=True,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        prefetch=prefetch,
    )
    fields = set()
    with pytest.raises(StageError, match="field 'weight'"):
        for batch in itertools.islice(pipeline, RECORDS // batch_size + 1):
            fields.add(frozenset(batch))
    assert len(fields) <= 1
    assert pipeline.get_state()["source"]["current_epoch"] == 0


def test_a_batch_whose_records_all_lack_a_field_of_earlier_batches_is_an_error(data):
    pipeline = build(data, [drop_weight_from_first_eight])
    batches = iter(pipeline)
    assert "weight" in next(batches)
    with pytest.raises(
        StageError, match=r"field 'weight': every record of the batch of records 8 "
    ):
        next(batches)


# Shapes (issue 12: ragged batches) ---------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_field_whose_shape_differs_in_a_batch_names_it_and_suggests_pad_or_packing(
    data, num_workers
):
    with pytest.raises(StageError) as raised:
        next(iter(build(data, [ragged_tokens], num_workers=num_workers)))
    message = str(raised.value)
    assert "field 'tokens'" in message
    assert "shape" in message
    assert "resumax.Pad" in message
    assert "resumax.PackSequences" in message


# 2. Conversions made on the user's behalf ------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (int_or_float, "dtype: .*int64.*float64|dtype: .*float64.*int64"),
        (bool_or_int, "dtype: .*bool|dtype: .*int64.*bool"),
        (beyond_int64, "beyond int64.*record 9 "),
        (float32_or_float64, "dtype: .*float32.*float64|dtype: .*float64.*float32"),
        (nul_terminated, "NUL"),
    ],
)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_conversion_that_would_change_values_raises_config_error_naming_the_field(
    data, stage, expected, num_workers
):
    pipeline = build(data, [stage], batch_size=20, num_workers=num_workers)
    with pytest.raises(ConfigError, match=f"field 'value'.*({expected})"):
        take(pipeline, 3)


def test_values_of_one_type_per_field_are_stacked_exactly(data):
    (batch,) = take(build(data, [exact_python_values], batch_size=12), 1)
    ids = np.arange(12)
    assert batch["big"].dtype == np.int64
    np.testing.assert_array_equal(batch["big"], 2**62 + ids)
    np.testing.assert_array_equal(batch["negative"], -(2**63) + ids)
    assert batch["ratio"].dtype == np.float64
    assert batch["ratio"].tolist() == [index / 7 for index in range(12)]
    assert batch["flag"].dtype == np.bool_
    assert batch["name"].tolist() == ["r" * (index % 4 + 1) for index in range(12)]
    assert batch["pair"].tolist() == [[index, index + 1] for index in range(12)]


def test_numbers_of_one_type_in_some_batches_and_another_in_later_ones_are_an_error(data):
    # Batch 0 (records 0-2) holds only floats; batch 1 only ints: no batch mixes them.
    pipeline = build(data, [float_then_int], batch_size=3)
    batches = iter(pipeline)
    assert next(batches)["value"].dtype == np.float64
    with pytest.raises(ConfigError, match="field 'value'.*int64.*float64"):
        next(batches)


# 2. Stage results the next step cannot use -----------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    ("stage", "returned"), [(forget_to_return, "NoneType None"), (as_tuple, "tuple")]
)
def test_a_record_stage_returning_no_dict_names_the_stage_and_the_record(
    data, num_workers, stage, returned
):
    pipeline = build(data, [stage], num_workers=num_workers)
    with pytest.raises(StageError) as raised:
        next(iter(pipeline))
    message = str(raised.value)
    assert f"stage 0 ({stage.__name__}) returned {returned}" in message
    assert "record 0 (epoch 0, position 0)" in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stage_raising_stop_iteration_is_an_error_not_the_end_of_the_data(data, num_workers):
    pipeline = build(data, [stop_iteration_on_record_9], num_workers=num_workers, prefetch=2)
    batches = iter(pipeline)
    next(batches)
    with pytest.raises(StageError, match=r"stage 0 \(stop_iteration_on_record_9\).*record 9"):
        next(batches)


@pytest.mark.parametrize("num_epochs", [-1, 1])
@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (batch_forget_to_return, r"returned NoneType None for the batch of records 0 "),
        (batch_with_python_float, r"field \['mean'\] is float"),
        (batch_stop_iteration, r"failed: StopIteration"),
    ],
)
def test_a_batch_stage_returning_no_batch_is_an_error_not_the_end_of_the_data(
    data, num_epochs, stage, expected
):
    config = ArrayRecordSourceConfig(seed=0, num_epochs=num_epochs, shuffle_files=False)
    pipeline = Pipeline(ArrayRecordSourceModule(config, data), [BatchMap(stage)], batch_size=8)
    with pytest.raises(StageError, match=rf"batch stage \({stage.__name__}\).*{expected}"):
        next(iter(pipeline))


def test_a_worker_result_that_cannot_be_pickled_names_the_stage_field_and_record(data):
    pipeline = build(data, [with_a_lock], num_workers=2)
    with pytest.raises(StageError) as raised:
        take(pipeline, 3)
    message = str(raised.value)
    assert "stage 0 (with_a_lock)" in message
    assert "field 'lock' of record 11 (epoch 0, position 11)" in message
    assert "cannot be sent from a worker process" in message


@pytest.mark.parametrize(
    ("stage", "expected"),
    [(int_or_float, "dtype"), (beyond_int64, "beyond int64"), (float32_or_float64, "dtype")],
)
def test_stored_records_whose_types_differ_are_a_config_error_without_any_stage(
    tmp_path, stage, expected
):
    # No stage: the records go through the source's batch decode, under the same policy.
    path = tmp_path / "mixed.array_record"
    write_array_record(path, [stage({"id": index}) for index in range(20)])
    with pytest.raises(ConfigError, match=f"field 'value'.*{expected}"):
        take(build(str(path), batch_size=20), 1)
