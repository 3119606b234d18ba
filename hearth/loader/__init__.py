"""Checkpoint formats → tensors. Never imports models."""


class ModelLoadError(Exception):
    """A model file or folder that cannot be loaded; the message names the path and the reason in one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
