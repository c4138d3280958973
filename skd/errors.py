"""Errors skd raises on purpose."""


class UnsupportedModelError(TypeError):
    """The model (or one of its modules) cannot be stratified or truncated; the message names it and why."""
