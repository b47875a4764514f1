"""Records at rest: the codec (dict of arrays <-> msgpack bytes), ArrayRecord writers, the shard
index beside a set of files, and `tf.train.Example` parsing without TensorFlow.
"""

from resumax.records.codec import decode, encode
from resumax.records.tfexample import TFExample
from resumax.records.writers import ArrayRows, shard_paths, write_array_record, write_shards

__all__ = [
    "ArrayRows",
    "TFExample",
    "decode",
    "encode",
    "shard_paths",
    "write_array_record",
    "write_shards",
]
