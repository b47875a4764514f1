"""Old path of `resumax.tools.profile`: `from resumax.profile import profile_pipeline` works."""

from resumax.tools.profile import ProfileReport, profile_pipeline

__all__ = ["ProfileReport", "profile_pipeline"]
