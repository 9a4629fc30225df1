"""Embedded default data: the AFLOW prototype structures bundled inside pymatgen.

`builtin:aflow` gives 288 real crystal structures (the AFLOW Library of Crystallographic
Prototypes, Mehl et al. 2017) with no download, so a fresh install can run the whole pipeline
offline. Prototypes with more atoms than `validation.max_atoms` are rejected as `too_many_atoms`
like any other input.

Ids are `aflow-NNN-<label>`: the AFLOW label alone is not unique in the library (several
prototypes share one). The prototype's tags (`aflow`, `pearson`, `strukturbericht`, `mineral`)
are offered as raw columns, so `PropertyColumn(column="pearson", name="pearson", kind="str")`
maps one without code.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.schema.data import ReaderConfig

BUILTIN_SETS = ("aflow",)


@lru_cache(maxsize=1)
def aflow_library() -> list[dict]:
    """The library as plain JSON (lattice matrix, sites with species and fractional coordinates).

    Read straight from pymatgen's data file: importing `pymatgen.analysis.prototypes` builds
    StructureNL objects for all 288 entries, which takes seconds; the JSON takes milliseconds.
    """
    with gzip.open(aflow_data_file(), "rt", encoding="utf-8") as handle:
        return json.load(handle)


def aflow_data_file() -> Path:
    """The file pymatgen ships the library in (also hashed to fingerprint builds)."""
    spec = importlib.util.find_spec("pymatgen.analysis.prototypes")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pymatgen.analysis.prototypes not found: is pymatgen installed?")
    return Path(next(iter(spec.submodule_search_locations))) / "aflow_prototypes.json.gz"


def builtin_fingerprint(name: str) -> dict:
    """{"path", "sha256", "bytes"} of the data behind a builtin input (for manifests and resume)."""
    data = aflow_data_file().read_bytes()
    return {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def iter_builtin(name: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    dataset = name.split(":", 1)[1]
    if dataset not in BUILTIN_SETS:
        yield Rejection(id=name, source=name, reason="unreadable_file",
                        detail=f"unknown builtin set {dataset!r}; available: {', '.join(BUILTIN_SETS)}")
        return
    for k, entry in enumerate(aflow_library()):
        snl = entry["snl"]
        tags = {key: str(value) for key, value in entry["tags"].items() if value is not None}
        sites = snl["sites"]
        payload = {
            "cell": snl["lattice"]["matrix"],
            "frac_coords": [site["abc"] for site in sites],
            # A site with several species or occupancy < 1 is disordered; validation rejects it.
            "symbols": [site["species"][0]["element"] for site in sites],
            "occupancies": [sum(sp["occu"] for sp in site["species"]) if len(site["species"]) == 1 else 0.5
                            for site in sites],
            "pbc": [True, True, True],
        }
        yield RawItem(
            source=f"{name}:{k}",
            index=-1,
            id=f"aflow-{k:03d}-{tags.get('aflow', 'unknown')}",
            kind="atoms_dict",
            payload=payload,
            properties={key: value for key, value in tags.items()
                        if any(c.column == key for c in cfg.properties)},
            split=None,
        )
