"""The CDVAE / DiffCSP generation benchmark metrics: validity, coverage (COV-R, COV-P) and
Wasserstein distances of density and of the number of elements, against a test split.

Definitions follow CDVAE's `scripts/compute_metrics.py` and `scripts/eval_utils.py`
(txie-93/cdvae, which DiffCSP reuses), so the numbers sit beside the published tables:

* validity: structural (no pair < 0.5 Å, volume > 0.1 Å³) and compositional (SMACT), see
  validity.py; a crystal whose structure fingerprint cannot be computed is invalid;
* structure fingerprint: matminer's `CrystalNNFingerprint.from_preset("ops")` per site (CrystalNN
  coordination weights × local order parameters for CN 1..24), averaged over sites (61 numbers);
* composition fingerprint: matminer's `ElementProperty.from_preset("magpie")` (22 Magpie elemental
  properties × minimum, maximum, range, mean, avg_dev, mode, weighted by amount; 132 numbers), with
  NaN for elements the Magpie table lacks a value for, as in matminer 0.7.3 (CDVAE's version; no
  imputation);
* standardisation of composition fingerprints: CDVAE's fixed `CompScaler` (`CompScalerMeans` /
  `CompScalerStds`, statistics of its MP-20 training set), NaN → 0 after scaling. It is never fitted
  on the generated or the test structures;
* COV-R: fraction of test structures with a generated structure within both cutoffs (Euclidean
  distances); COV-P: fraction of all generated structures within both cutoffs of a test structure
  (those without fingerprints count as misses); cutoffs (structure, composition) from CDVAE's
  `COV_Cutoffs`: Perov-5 (0.2, 4), Carbon-24 (0.2, 4), MP-20 (0.4, 10);
* Wasserstein distances (scipy) of density (g/cm³) and number of elements: 1,000 valid generated
  structures drawn at random (all of them when fewer are valid; CDVAE refuses to score those)
  vs every test structure.

Why not matminer itself: matminer (0.10.1, the newest) requires pandas < 3, while this project pins
pandas 3 (requirements/ci.txt), and it pulls scikit-learn, pymongo and sympy for what is a lookup
table; and since 0.10 its Magpie data imputes NaNs by default, which no longer gives CDVAE's numbers.
So the featurizers are implemented here and the data ship with the package (`data/`, with sources
and licences in data/README.md): the Magpie table for the 22 properties (matminer's `.table` files,
unchanged from 0.7.3 to 0.10.1) and CDVAE's scaler constants. The structure fingerprint is built
exactly as matminer does on top of pymatgen's CrystalNN and LocalStructOrderParams.
`benchmarks/cdvae_parity.py` checks both fingerprints against matminer in a separate environment.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

from xtalgen.evaluation.validity import VALID, compositional_validity, structural_validity

COV_CUTOFFS = {  # (structure, composition): CDVAE's COV_Cutoffs in scripts/compute_metrics.py
    "perov_5": (0.2, 4.0),
    "carbon_24": (0.2, 4.0),
    "mp_20": (0.4, 10.0),
}

# matminer's `CrystalNNFingerprint.from_preset("ops")`: motifs judged at each coordination number.
CN_TARGET_MOTIFS: dict[int, list[str]] = {
    1: ["sgl_bd"],
    2: ["L-shaped", "water-like", "bent 120 degrees", "bent 150 degrees", "linear"],
    3: ["trigonal planar", "trigonal non-coplanar", "T-shaped"],
    4: ["square co-planar", "tetrahedral", "rectangular see-saw-like", "see-saw-like", "trigonal pyramidal"],
    5: ["pentagonal planar", "square pyramidal", "trigonal bipyramidal"],
    6: ["hexagonal planar", "octahedral", "pentagonal pyramidal"],
    7: ["hexagonal pyramidal", "pentagonal bipyramidal"],
    8: ["body-centered cubic", "hexagonal bipyramidal"],
    9: ["q2", "q4", "q6"],
    10: ["q2", "q4", "q6"],
    11: ["q2", "q4", "q6"],
    12: ["cuboctahedral", "q2", "q4", "q6"],
}
MAX_CN = 24

MAGPIE_PROPERTIES = [
    "Number", "MendeleevNumber", "AtomicWeight", "MeltingT", "Column", "Row", "CovalentRadius",
    "Electronegativity", "NsValence", "NpValence", "NdValence", "NfValence", "NValence",
    "NsUnfilled", "NpUnfilled", "NdUnfilled", "NfUnfilled", "NUnfilled", "GSvolume_pa",
    "GSbandgap", "GSmagmom", "SpaceGroupNumber",
]
MAGPIE_STATS = ["minimum", "maximum", "range", "mean", "avg_dev", "mode"]
MAGPIE_TABLE = "magpie_elements.csv"  # in data/, see data/README.md
CDVAE_SCALER = "cdvae_comp_scaler.json"


# --- structure fingerprint -------------------------------------------------------------------------
class CrystalNNFingerprint:
    """Per-site CrystalNN "ops" fingerprint (same vector as matminer's preset, 61 numbers)."""

    def __init__(self):
        from pymatgen.analysis.local_env import CN_OPT_PARAMS, CrystalNN, LocalStructOrderParams

        self.cnn = CrystalNN()
        self.ops: dict[int, list] = {}
        for cn in range(1, MAX_CN + 1):
            ops: list = ["wt"]
            for motif in CN_TARGET_MOTIFS.get(cn, []):
                op_type, params = motif, None
                if motif in CN_OPT_PARAMS.get(cn, {}):
                    spec = CN_OPT_PARAMS[cn][motif]
                    op_type, params = spec[0], (spec[1] if len(spec) > 1 else None)
                ops.append(LocalStructOrderParams([op_type], parameters=[params]))
            self.ops[cn] = ops

    def site(self, structure: Structure, index: int) -> list[float]:
        nn = self.cnn.get_nn_data(structure, index)
        out: list[float] = []
        for cn in range(1, MAX_CN + 1):
            weight = nn.cn_weights.get(cn, 0)
            for op in self.ops[cn]:
                if op == "wt" or weight == 0:
                    out.append(weight)
                    continue
                neighbours = [d["site"] for d in nn.cn_nninfo[cn]]
                value = op.get_order_parameters(
                    [structure[index], *neighbours], 0, indices_neighs=list(range(1, len(neighbours) + 1))
                )[0]
                out.append(weight * (value or 0))
        return out

    def structure(self, structure: Structure) -> np.ndarray | None:
        """Mean over sites; None when CrystalNN fails (CDVAE then counts the crystal invalid)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sites = [self.site(structure, i) for i in range(len(structure))]
        except Exception:
            return None
        return np.asarray(sites, dtype=np.float64).mean(axis=0)  # (61,)


# --- composition fingerprint -------------------------------------------------------------------------
def _data_file(name: str):
    from importlib.resources import files

    return files("xtalgen.evaluation").joinpath("data", name)


@cache
def _magpie_table() -> dict[str, dict[str, float]]:
    """Symbol → the 22 Magpie properties (NaN where Magpie has no value), from the shipped table."""
    import csv
    import io

    rows = csv.DictReader(io.StringIO(_data_file(MAGPIE_TABLE).read_text()))
    return {
        row["symbol"]: {p: float(row[p]) if row[p] else float("nan") for p in MAGPIE_PROPERTIES}
        for row in rows
    }


def _stat(name: str, values: np.ndarray, weights: np.ndarray) -> float:
    """matminer's PropertyStats (NaN in → NaN out, as there)."""
    if name == "minimum":
        return float(values.min())
    if name == "maximum":
        return float(values.max())
    if name == "range":
        return float(values.max() - values.min())
    mean = float(np.average(values, weights=weights))
    if name == "mean":
        return mean
    if name == "avg_dev":
        return float(np.average(np.abs(values - mean), weights=weights))
    if name == "mode":  # the value of the most abundant element; ties → smallest value
        most = np.isclose(weights, weights.max())
        return float(values[most].min())
    raise ValueError(name)


def composition_fingerprint(composition: Composition) -> np.ndarray:
    """Magpie ElementProperty vector (132 numbers, may contain NaN), as matminer computes it."""
    table = _magpie_table()
    # matminer weights by the amounts of `element_composition`, not by fractions (the mode's
    # tie test is np.isclose on these numbers).
    items = list(Composition(composition).element_composition.items())
    weights = np.array([amount for _, amount in items], dtype=np.float64)
    out = []
    for prop in MAGPIE_PROPERTIES:
        values = np.array([table.get(el.symbol, {}).get(prop, np.nan) for el, _ in items], dtype=np.float64)
        out.extend(_stat(stat, values, weights) for stat in MAGPIE_STATS)
    return np.asarray(out)


@cache
def _cdvae_scaler_constants() -> tuple[tuple[float, ...], tuple[float, ...]]:
    data = json.loads(_data_file(CDVAE_SCALER).read_text())
    return tuple(data["means"]), tuple(data["stds"])


class CompositionScaler:
    """Standardisation of composition fingerprints, NaN → 0 afterwards (CDVAE's StandardScaler
    with `replace_nan_token=0.`). `CompositionScaler.cdvae()` is CDVAE's fixed one, the default."""

    def __init__(self, means: Sequence[float], stds: Sequence[float]):
        self.means = np.asarray(means, dtype=np.float64)
        self.stds = np.asarray(stds, dtype=np.float64)
        if self.means.shape != (132,) or self.stds.shape != (132,):
            raise ValueError(f"a composition scaler needs 132 means and stds, got {self.means.shape}, {self.stds.shape}")

    @classmethod
    def cdvae(cls) -> CompositionScaler:
        """CDVAE's `CompScaler`: `CompScalerMeans` / `CompScalerStds` (MP-20 training statistics)."""
        return cls(*_cdvae_scaler_constants())

    @classmethod
    def load(cls, path: str | Path) -> CompositionScaler:
        data = json.loads(Path(path).read_text())
        return cls(data["means"], data["stds"])

    def transform(self, fingerprints: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            scaled = (np.asarray(fingerprints, dtype=np.float64) - self.means) / self.stds
        return np.where(np.isnan(scaled), 0.0, scaled)


# --- per-structure features (parallel) -------------------------------------------------------------
@cache
def _fingerprinter() -> CrystalNNFingerprint:
    return CrystalNNFingerprint()


def _features(structure_dict: dict | None) -> dict:
    if structure_dict is None:
        return {"valid": False, "struct_fp": None, "comp_fp": None, "density": np.nan, "num_elements": 0}
    structure = Structure.from_dict(structure_dict)
    structural = structural_validity(structure)
    valid = structural.valid and compositional_validity(structure) == VALID
    struct_fp = _fingerprinter().structure(structure)
    return {
        "valid": bool(valid and struct_fp is not None),
        "struct_fp": struct_fp,
        "comp_fp": composition_fingerprint(structure.composition),
        "density": float(structure.density) if structural.volume > 0 else np.nan,
        "num_elements": len(structure.composition.elements),
    }


def featurize(structures: Sequence[Structure | None], workers: int = 1, progress: bool = False) -> list[dict]:
    from tqdm.auto import tqdm

    payload = [s.as_dict() if s is not None else None for s in structures]
    if workers <= 1:
        return [_features(p) for p in tqdm(payload, desc="fingerprints", disable=not progress)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(_features, payload, chunksize=16), total=len(payload),
                         desc="fingerprints", disable=not progress))


def save_features(path: str | Path, features: list[dict]) -> None:
    """Fingerprints of a test split as a plain .npz (no pickle), so each split is featurized once."""
    struct = np.stack([f["struct_fp"] if f["struct_fp"] is not None else np.full(61, np.nan) for f in features])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        struct_fp=struct,  # (M, 61), NaN rows where CrystalNN failed
        comp_fp=np.stack([f["comp_fp"] for f in features]),  # (M, 132)
        density=np.array([f["density"] for f in features], dtype=np.float64),
        num_elements=np.array([f["num_elements"] for f in features], dtype=np.int64),
        valid=np.array([f["valid"] for f in features], dtype=bool),
    )
    tmp.replace(path)


def load_features(path: str | Path) -> list[dict]:
    # Each `data[key]` decompresses the whole array again, and a row kept from it keeps that whole
    # copy alive: read every array once (per-row access took 22 GB for a 3,785-structure split).
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in ("struct_fp", "comp_fp", "density", "num_elements", "valid")}
    struct_fp, comp_fp = arrays["struct_fp"], arrays["comp_fp"]
    return [
        {
            "struct_fp": None if np.isnan(struct_fp[i]).all() else struct_fp[i],
            "comp_fp": comp_fp[i],
            "density": float(arrays["density"][i]),
            "num_elements": int(arrays["num_elements"][i]),
            "valid": bool(arrays["valid"][i]),
        }
        for i in range(len(arrays["valid"]))
    ]


def magpie_source() -> str:
    """Which elemental table composition fingerprints use (part of any cache key): the shipped table's hash."""
    import hashlib

    digest = hashlib.sha256(_data_file(MAGPIE_TABLE).read_bytes()).hexdigest()[:12]
    return f"magpie-{digest}"


# --- the metrics -------------------------------------------------------------------------------------
def dataset_name(hint: str) -> str:
    """CDVAE dataset name from a path or name: perov_5, carbon_24 or mp_20 (the default)."""
    hint = hint.lower().replace("-", "_")
    if "perov" in hint:
        return "perov_5"
    if "carbon" in hint:
        return "carbon_24"
    return "mp_20"


def cdvae_metrics(
    generated: Sequence[Structure | None],
    test: Sequence[Structure],
    dataset: str = "mp_20",
    *,
    comp_scaler: CompositionScaler | None = None,
    workers: int = 1,
    progress: bool = False,
    test_features: list[dict] | None = None,
    wdist_samples: int | None = 1000,
    seed: int = 0,
) -> dict:
    """Validity, COV-R/COV-P and Wasserstein distances of generated structures vs a test split.

    `comp_scaler` defaults to CDVAE's fixed scaler. The Wasserstein distances use `wdist_samples`
    valid generated structures drawn without replacement (seeded), as CDVAE's `GenEval` does with
    1,000; all valid ones when there are no more than that, or when `wdist_samples` is None.
    """
    struct_cutoff, comp_cutoff = COV_CUTOFFS[dataset]
    gen = featurize(generated, workers, progress)
    ref = test_features if test_features is not None else featurize(test, workers, progress)

    ref_ok = [f for f in ref if f["struct_fp"] is not None]
    scaler = comp_scaler or CompositionScaler.cdvae()  # fixed, never fitted on these structures
    ref_struct = np.stack([f["struct_fp"] for f in ref_ok])  # (M, 61)
    ref_comp = scaler.transform(np.stack([f["comp_fp"] for f in ref_ok]))  # (M, 132)
    gen_ok = [f for f in gen if f["struct_fp"] is not None and f["comp_fp"] is not None]

    metrics: dict = {"dataset": dataset, "struct_cutoff": struct_cutoff, "comp_cutoff": comp_cutoff,
                     "num_generated": len(gen), "num_test": len(ref_ok)}
    n_gen = len(gen)
    if gen_ok:
        gen_struct = np.stack([f["struct_fp"] for f in gen_ok])
        gen_comp = scaler.transform(np.stack([f["comp_fp"] for f in gen_ok]))
        struct_dist = cdist(gen_struct, ref_struct)  # (G, M)
        comp_dist = cdist(gen_comp, ref_comp)
        recall_hit = (struct_dist.min(axis=0) <= struct_cutoff) & (comp_dist.min(axis=0) <= comp_cutoff)
        precision_hit = (struct_dist.min(axis=1) <= struct_cutoff) & (comp_dist.min(axis=1) <= comp_cutoff)
        metrics["cov_recall"] = float(recall_hit.mean())
        metrics["cov_precision"] = float(precision_hit.sum() / n_gen)
        metrics["amsd_recall"] = float(struct_dist.min(axis=0).mean())
        metrics["amsd_precision"] = float(struct_dist.min(axis=1).mean())
        metrics["amcd_recall"] = float(comp_dist.min(axis=0).mean())
        metrics["amcd_precision"] = float(comp_dist.min(axis=1).mean())
    else:
        metrics.update(cov_recall=0.0, cov_precision=0.0)

    struct_valid = [
        s is not None and structural_validity(s).valid for s in generated
    ]
    comp_valid = [s is not None and compositional_validity(s) == VALID for s in generated]
    metrics["struct_validity"] = float(np.mean(struct_valid)) if n_gen else float("nan")
    metrics["comp_validity"] = float(np.mean(comp_valid)) if n_gen else float("nan")
    metrics["validity"] = float(np.mean([f["valid"] for f in gen])) if n_gen else float("nan")

    valid = [f for f in gen if f["valid"]]
    if wdist_samples is not None and len(valid) > wdist_samples:
        chosen = np.random.default_rng(seed).choice(len(valid), wdist_samples, replace=False)
        valid = [valid[i] for i in chosen]
    metrics["wdist_samples"] = len(valid)
    if valid:
        metrics["wdist_density"] = float(wasserstein_distance(
            [f["density"] for f in valid], [f["density"] for f in ref]))
        metrics["wdist_num_elements"] = float(wasserstein_distance(
            [f["num_elements"] for f in valid], [f["num_elements"] for f in ref]))
    else:
        metrics.update(wdist_density=float("nan"), wdist_num_elements=float("nan"))
    return metrics
