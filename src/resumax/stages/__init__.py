"""What a pipeline does to records between reading and the caller: per-record maps and filters,
batch maps, nnx operators, Grain transforms, padding and sequence packing.
"""

from resumax.stages.packing import PackSequences
from resumax.stages.pad import Pad
from resumax.stages.transforms import BatchMap, Filter, Map, MapWithIndex, RandomMap

__all__ = ["BatchMap", "Filter", "Map", "MapWithIndex", "PackSequences", "Pad", "RandomMap"]
