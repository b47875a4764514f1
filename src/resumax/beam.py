"""`resumax.beam.WriteShards`: write a shard set with its index from your own Apache Beam
pipeline (needs the optional extra `resumax[beam]`)."""

from resumax.convert.beam import WriteShards

__all__ = ["WriteShards"]
