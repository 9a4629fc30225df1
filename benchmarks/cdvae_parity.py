"""Parity of xtalgen's CDVAE fingerprints with matminer, the library CDVAE computed them with.

    python benchmarks/cdvae_parity.py --n 200

matminer cannot live in the project's environment (it requires pandas < 3), so this script builds a
throwaway virtual environment (default build/matminer-venv) with matminer 0.10.1, pandas < 3 and
the project's pins of numpy, scipy and pymatgen, runs itself there with `--reference` to compute
matminer's fingerprints, then compares them here with xtalgen's:

* the Magpie elemental table: the 22 properties of `ElementProperty.from_preset("magpie")` for
  Z = 1..103 from `MagpieData(impute_nan=False)` (the data as matminer 0.7.3, CDVAE's version, read
  it) vs the table shipped in xtalgen/evaluation/data;
* composition fingerprints, computed the way CDVAE's `Crystal.get_fingerprints` does
  (`Composition(Counter(atomic numbers))`), and structure fingerprints
  (`CrystalNNFingerprint.from_preset("ops")`, mean over sites), for the first N structures of the
  Perov-5 and Carbon-24 test splits beside the repository (../shared/data);
* the COV/AMSD/AMCD numbers of CDVAE's `compute_cov` on matminer's fingerprints vs
  `cdvae_metrics` on xtalgen's (generated = the first N/2 Perov-5 structures, test = the next N/2).

Prints one JSON line and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
MATMINER = "matminer==0.10.1"
PINNED_FROM_CI = ("numpy", "scipy", "pymatgen", "pymatgen-core", "spglib", "monty", "networkx", "sympy")
MAGPIE_PROPERTIES = [
    "Number", "MendeleevNumber", "AtomicWeight", "MeltingT", "Column", "Row", "CovalentRadius",
    "Electronegativity", "NsValence", "NpValence", "NdValence", "NfValence", "NValence",
    "NsUnfilled", "NpUnfilled", "NdUnfilled", "NfUnfilled", "NUnfilled", "GSvolume_pa",
    "GSbandgap", "GSmagmom", "SpaceGroupNumber",
]


# --- runs in the matminer environment (no xtalgen imports) --------------------------------------------
def reference(inputs: Path, output: Path) -> None:
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint
    from matminer.utils.data import MagpieData
    from pymatgen.core import Composition, Element, Structure

    warnings.filterwarnings("ignore")
    # matminer >= 0.10 imputes missing Magpie values by default; CDVAE's 0.7.3 had no imputation.
    kwargs = {"impute_nan": False} if "impute_nan" in inspect.signature(ElementProperty.from_preset).parameters else {}
    comp_fp = ElementProperty.from_preset("magpie", **kwargs)
    struct_fp = CrystalNNFingerprint.from_preset("ops")
    magpie = MagpieData(impute_nan=False) if kwargs else MagpieData()
    table = np.array([[magpie.get_elemental_property(Element.from_Z(z), p) for p in MAGPIE_PROPERTIES]
                      for z in range(1, 104)], dtype=np.float64)

    cifs = json.loads(inputs.read_text())
    comps, structs = [], []
    for cif in cifs:
        structure = Structure.from_str(cif, fmt="cif")
        comps.append(comp_fp.featurize(Composition(Counter(site.specie.Z for site in structure))))
        try:
            sites = [struct_fp.featurize(structure, i) for i in range(len(structure))]
            structs.append(np.array(sites).mean(axis=0))
        except Exception:
            structs.append(np.full(61, np.nan))
    from importlib.metadata import version

    np.savez(output, table=table, comp_fp=np.array(comps, dtype=np.float64), struct_fp=np.array(structs),
             versions=np.array([version("matminer"), version("pandas"), version("pymatgen"), version("numpy")]))


# --- runs in the project environment --------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import matminer"], capture_output=True).returncode == 0:
        return python
    pins = {}
    for line in (REPO / "requirements" / "ci.txt").read_text().splitlines():
        name, _, ver = line.partition("==")
        if name.strip().lower() in PINNED_FROM_CI and ver:
            pins[name.strip()] = f"{name.strip()}=={ver.strip()}"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", MATMINER, "pandas<3", *pins.values()], check=True)
    return python


def compute_cov_like_cdvae(gen_struct, gen_comp, gt_struct, gt_comp, struc_cutoff, comp_cutoff, scaler):
    """CDVAE's eval_utils.compute_cov, on matminer's fingerprints (all fingerprints present here)."""
    from scipy.spatial.distance import cdist

    struc_pdist = cdist(gen_struct, gt_struct)
    comp_pdist = cdist(scaler.transform(gen_comp), scaler.transform(gt_comp))
    sr, sp = struc_pdist.min(axis=0), struc_pdist.min(axis=1)
    cr, cp = comp_pdist.min(axis=0), comp_pdist.min(axis=1)
    return {
        "cov_recall": float(np.mean((sr <= struc_cutoff) & (cr <= comp_cutoff))),
        "cov_precision": float(np.sum((sp <= struc_cutoff) & (cp <= comp_cutoff)) / len(gen_struct)),
        "amsd_recall": float(sr.mean()), "amsd_precision": float(sp.mean()),
        "amcd_recall": float(cr.mean()), "amcd_precision": float(cp.mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="structures from each test split")
    parser.add_argument("--venv", default=str(REPO / "build" / "matminer-venv"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--reference", nargs=2, metavar=("CIFS_JSON", "OUT_NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(Path(args.reference[0]), Path(args.reference[1]))
        return 0

    import pandas as pd
    from pymatgen.core import Element, Structure

    from xtalgen.evaluation import cdvae_metrics as cm

    warnings.filterwarnings("ignore")
    data = Path(args.data)
    splits = {"perov_5": data / "perov_5" / "test.csv", "carbon_24": data / "carbon_24" / "test.csv"}
    cifs = {name: list(pd.read_csv(path, index_col=0, nrows=args.n)["cif"]) for name, path in splits.items()}
    all_cifs = cifs["perov_5"] + cifs["carbon_24"]

    python = ensure_venv(Path(args.venv))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cifs.json").write_text(json.dumps(all_cifs))
        env = {**os.environ, "PYTHONPATH": ""}
        subprocess.run([python, __file__, "--reference", str(Path(tmp) / "cifs.json"), str(Path(tmp) / "ref.npz")],
                       check=True, env=env, cwd=tmp)
        with np.load(Path(tmp) / "ref.npz") as ref:
            ref = {k: ref[k] for k in ref.files}

    structures = [Structure.from_str(cif, fmt="cif") for cif in all_cifs]
    table = cm._magpie_table()
    ours_table = np.array([[table[Element.from_Z(z).symbol][p] for p in cm.MAGPIE_PROPERTIES]
                           for z in range(1, 104)])
    ours_comp = np.array([cm.composition_fingerprint(s.composition) for s in structures])
    featurizer = cm.CrystalNNFingerprint()
    ours_struct = np.array([(lambda v: np.full(61, np.nan) if v is None else v)(featurizer.structure(s))
                            for s in structures])

    def diff(a, b) -> float:
        both = ~(np.isnan(a) & np.isnan(b))
        return float(np.nanmax(np.abs(a[both] - b[both]))) if both.any() else 0.0

    scaler = cm.CompositionScaler.cdvae()
    half = args.n // 2
    gen, test = structures[:half], structures[half:args.n]
    ours_metrics = cm.cdvae_metrics(gen, test, "perov_5")
    theirs_metrics = compute_cov_like_cdvae(ref["struct_fp"][:half], ref["comp_fp"][:half],
                                            ref["struct_fp"][half:args.n], ref["comp_fp"][half:args.n],
                                            *cm.COV_CUTOFFS["perov_5"], scaler)
    n_perov = len(cifs["perov_5"])
    report = {
        "benchmark": "cdvae_parity",
        "reference_versions": dict(zip(["matminer", "pandas", "pymatgen", "numpy"], ref["versions"].tolist())),
        "structures": {"perov_5": n_perov, "carbon_24": len(cifs["carbon_24"])},
        "magpie_table_identical": bool(np.array_equal(ours_table, ref["table"], equal_nan=True)),
        "magpie_table_max_abs_diff": diff(ours_table, ref["table"]),
        "comp_fp_identical": int(sum(np.array_equal(a, b, equal_nan=True) for a, b in zip(ours_comp, ref["comp_fp"]))),
        "comp_fp_max_abs_diff": diff(ours_comp, ref["comp_fp"]),
        "comp_fp_scaled_max_abs_diff": diff(scaler.transform(ours_comp), scaler.transform(ref["comp_fp"])),
        "struct_fp_identical": int(sum(np.array_equal(a, b, equal_nan=True) for a, b in zip(ours_struct, ref["struct_fp"]))),
        "struct_fp_max_abs_diff": diff(ours_struct, ref["struct_fp"]),
        "cov_ours": {k: ours_metrics[k] for k in theirs_metrics},
        "cov_cdvae_on_matminer": theirs_metrics,
        # Known values for tests/test_cdvae_metrics.py: the first 3 Perov-5 test structures.
        "pins": [
            {"formula": structures[i].composition.formula,
             "comp_fp": ref["comp_fp"][i].tolist(), "struct_fp": ref["struct_fp"][i].tolist()}
            for i in range(min(3, n_perov))
        ],
    }
    total = len(structures)
    ok = (report["magpie_table_identical"] and report["comp_fp_identical"] == total
          and report["struct_fp_identical"] == total and report["cov_ours"] == theirs_metrics)
    report["parity"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
