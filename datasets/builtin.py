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

import hashlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from xtalgen.datasets.validation import Rejection
from xtalgen.schema.data import ReaderConfig

BUILTIN_SETS = ("aflow",)


@lru_cache(maxsize=1)
def aflow_library() -> list[dict]:
    from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    return AFLOW_PROTOTYPE_LIBRARY


def aflow_data_file() -> Path:
    """The file pymatgen loads the library from (hashed to fingerprint builds)."""
    import pymatgen.analysis.prototypes as prototypes

    return Path(prototypes.__file__).with_name("aflow_prototypes.json.gz")


def builtin_fingerprint(name: str) -> dict:
    """{"path", "sha256", "bytes"} of the data behind a builtin input (for manifests and resume)."""
    data = aflow_data_file().read_bytes()
    return {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def iter_builtin(name: str, cfg: ReaderConfig) -> Iterator:
    from xtalgen.datasets.readers import RawItem

    dataset = name.split(":", 1)[1]
    if dataset not in BUILTIN_SETS:
        yield Rejection(id=name, source=name, reason="unreadable_file",
                        detail=f"unknown builtin set {dataset!r}; available: {', '.join(BUILTIN_SETS)}")
        return
    for k, entry in enumerate(aflow_library()):
        structure = entry["snl"].structure
        tags = {key: str(value) for key, value in entry["tags"].items() if value is not None}
        payload = {
            "cell": structure.lattice.matrix.tolist(),
            "frac_coords": structure.frac_coords.tolist(),
            "symbols": [site.specie.symbol for site in structure],
            "occupancies": [1.0 if site.is_ordered else 0.5 for site in structure],
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
