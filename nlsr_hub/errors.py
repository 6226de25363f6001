"""nlsr-hub's error types (a leaf module: everything may import it)."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter directory or its contents cannot be used; the message says why and how to fix it."""


__all__ = ["AdapterError"]
