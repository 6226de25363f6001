"""nlsr-hub's error types (a leaf module: everything may import it)."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter directory or its contents cannot be used; the message says why and how to fix it."""


class MissingFileError(FileNotFoundError, ValueError):
    """An input file does not exist (a `ValueError` like every bad input, and still a `FileNotFoundError`)."""


class UnreadableFileError(PermissionError, ValueError):
    """An input file exists but cannot be read (a `ValueError` like every bad input, and still a `PermissionError`)."""


__all__ = ["AdapterError", "MissingFileError", "UnreadableFileError"]
