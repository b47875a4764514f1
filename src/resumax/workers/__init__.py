"""Worker processes that read, decode and run per-record stages for a pipeline: the pool (parent
side), the worker's main loop, and the shared-memory buffers their results travel in.
"""
