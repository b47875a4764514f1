"""The read path: `Pipeline` turns a source's positions into batches (read, decode, stages,
batch, device placement, prefetch) and keeps a state that describes the delivered batches.
"""

from resumax.pipeline.iterator import PipelineIterator
from resumax.pipeline.pipeline import Pipeline

__all__ = ["Pipeline", "PipelineIterator"]
