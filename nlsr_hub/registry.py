"""Registries of interchangeable parts (scorers, restorers): a name -> entry mapping with a helpful lookup."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of named entries whose `lookup` names the valid choices when a name is unknown."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        super().__init__()
        self.kind, self.plural = kind, plural or f"{kind}s"

    def lookup(self, name: str) -> T:
        """The entry registered as `name`; a `ValueError` lists the valid names otherwise."""
        try:
            return self[name]
        except KeyError:
            valid = ", ".join(sorted(self))
            raise ValueError(f"Unknown `{self.kind}` {name!r}; valid {self.plural}: {valid}.") from None


__all__ = ["Registry"]
