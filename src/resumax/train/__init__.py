"""The reference training application built on the resumax library: config, models, data
preparation, the training loop, its run log and preemption handling.

The library (records, order, sources, stages, pipeline, checkpoint) never imports this package.
"""
