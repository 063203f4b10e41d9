"""The loaded workflows, by name and by definition hash.

Runs remember the `def_hash` they started with, so every version stays reachable by
hash; new runs take `latest(name)`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import cmp_to_key
from pathlib import Path

from server.definitions.loader import LoadedWorkflow, load_paths


def compare_versions(a: str, b: str) -> int:
    """Numerically when both are integers (so 10 > 9), else as strings.

    Not a total order across mixed styles (2 < 10 < "1x" < 2); keep one style per name.
    """
    if a.isascii() and a.isdigit() and b.isascii() and b.isdigit():
        a_key: int | str = int(a)
        b_key: int | str = int(b)
    else:
        a_key, b_key = a, b
    return (a_key > b_key) - (a_key < b_key)


_BY_VERSION = cmp_to_key(lambda x, y: compare_versions(x.model.version, y.model.version))


class Catalog:
    def __init__(self) -> None:
        self._by_hash: dict[str, LoadedWorkflow] = {}
        self._by_name: dict[str, list[LoadedWorkflow]] = {}

    @classmethod
    def from_paths(
        cls, paths: Sequence[str | Path], known_handlers: Collection[str] | None = None
    ) -> tuple[Catalog, list[str]]:
        catalog = cls()
        loaded, problems = load_paths(paths, known_handlers)
        for wf in loaded:
            catalog.add(wf)
        return catalog, problems

    def add(self, loaded: LoadedWorkflow) -> None:
        if loaded.def_hash in self._by_hash:
            return  # the same definition again: nothing new
        self._by_hash[loaded.def_hash] = loaded
        self._by_name.setdefault(loaded.model.name, []).append(loaded)

    def latest(self, name: str) -> LoadedWorkflow | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def by_hash(self, def_hash: str) -> LoadedWorkflow | None:
        return self._by_hash.get(def_hash)

    def versions(self, name: str) -> list[LoadedWorkflow]:
        """Oldest first; among equal versions, the one added last comes last (sort is stable)."""
        return sorted(self._by_name.get(name, []), key=_BY_VERSION)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __len__(self) -> int:
        return len(self._by_hash)
