"""CDVAE metrics: the fingerprints pinned to matminer's values, CDVAE's fixed scaler, packaging.

Known values below come from matminer itself: `benchmarks/cdvae_parity.py` (matminer 0.10.1 with
`impute_nan=False`, pandas 2.3.3, pymatgen 2026.10.24, numpy 2.4.6, in its own environment); the
formulas are those of the first three structures of perov_5/test.csv, and the structure pins are
those three structures and an ideal cubic SrTiO3 built below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from pymatgen.core import Composition, Lattice, Structure

from xtalgen.evaluation.cdvae_metrics import (
    COV_CUTOFFS,
    MAGPIE_PROPERTIES,
    MAGPIE_STATS,
    CompositionScaler,
    CrystalNNFingerprint,
    cdvae_metrics,
    composition_fingerprint,
    magpie_source,
)

LABELS = [f"{p} {s}" for p in MAGPIE_PROPERTIES for s in MAGPIE_STATS]

# matminer ElementProperty.from_preset("magpie", impute_nan=False): a few entries, the sum of all 132
# and the norm after CDVAE's CompScaler.
COMPOSITION_PINS = {
    "TiOsNOF": ({"MendeleevNumber mean": 72.4, "CovalentRadius avg_dev": 41.92, "AtomicWeight maximum": 190.23,
                 "MeltingT minimum": 53.5, "Electronegativity range": 2.44, "GSvolume_pa mean": 12.87225,
                 "GSbandgap maximum": 6.437, "GSmagmom mean": 4.50666666666e-06, "SpaceGroupNumber mode": 12.0},
                11484.864067168, 12.096479714202014),
    "TlRuO2F": ({"MendeleevNumber mean": 79.8, "CovalentRadius avg_dev": 39.6, "AtomicWeight maximum": 204.3833,
                 "MeltingT minimum": 53.5, "Electronegativity range": 2.36, "GSvolume_pa mean": 13.6675,
                 "GSbandgap maximum": 1.97, "GSmagmom mean": 0.0, "SpaceGroupNumber mode": 12.0},
                9326.308040128002, 11.164232385533),
    "BiPtN2O": ({"MendeleevNumber mean": 80.0, "CovalentRadius avg_dev": 34.88, "AtomicWeight maximum": 208.9804,
                 "MeltingT minimum": 54.8, "Electronegativity range": 1.42, "GSvolume_pa mean": 17.322499999999998,
                 "GSbandgap maximum": 6.437, "GSmagmom mean": 0.0, "SpaceGroupNumber mode": 194.0},
                8289.923358, 14.253772166387801),
}
# Sum of the structure fingerprint and entries 2 (CN2 "L-shaped") and 12 (CN3 weight).
STRUCTURE_PINS = [
    (2.882737443983001, 0.23867312749779374, 0.5286410174895494),
    (1.8265981632332937, 0.6022688752523151, 0.0002546425188421322),
    (3.1148665013639945, 0.17230249535655928, 0.5953283905934488),
]


def _srtio3(a: float = 3.905, b_site: str = "Ti") -> Structure:
    return Structure(Lattice.cubic(a), ["Sr", b_site, "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


@pytest.mark.parametrize("formula", sorted(COMPOSITION_PINS))
def test_composition_fingerprint_matches_matminer(formula):
    entries, total, scaled_norm = COMPOSITION_PINS[formula]
    fingerprint = composition_fingerprint(Composition(formula))
    assert fingerprint.shape == (132,) and not np.isnan(fingerprint).any()
    for label, value in entries.items():
        assert fingerprint[LABELS.index(label)] == pytest.approx(value, rel=1e-12, abs=1e-15), label
    assert fingerprint.sum() == pytest.approx(total, rel=1e-12)
    scaled = CompositionScaler.cdvae().transform(fingerprint[None])[0]
    assert np.linalg.norm(scaled) == pytest.approx(scaled_norm, rel=1e-12)


def test_missing_magpie_values_stay_nan_as_in_matminer_0_7():
    # Magpie has no melting point for He and no electronegativity for He or Ne: matminer
    # (impute_nan=False) gives NaN for MeltingT min..avg_dev (its mode is Ne's, the most abundant)
    # and for all six Electronegativity statistics; matminer >= 0.10's default would impute them.
    fingerprint = composition_fingerprint(Composition("HeNe2"))
    assert list(np.where(np.isnan(fingerprint))[0]) == [18, 19, 20, 21, 22, 42, 43, 44, 45, 46, 47]
    assert np.nansum(fingerprint) == pytest.approx(1941.7174553333332, rel=1e-12)
    assert np.nansum(composition_fingerprint(Composition("SrTiO3"))) == pytest.approx(7595.410464784, rel=1e-12)
    # NaN becomes 0 after scaling, as CDVAE's StandardScaler(replace_nan_token=0.) does.
    assert not np.isnan(CompositionScaler.cdvae().transform(fingerprint[None])).any()


def test_structure_fingerprint_of_ideal_perovskite_matches_matminer():
    fingerprint = CrystalNNFingerprint().structure(_srtio3())
    assert fingerprint.sum() == pytest.approx(2.5318606177100387, rel=1e-12)
    assert fingerprint[2] == pytest.approx(0.3105007233615039, rel=1e-12)  # CN2 L-shaped
    assert fingerprint[44] == pytest.approx(0.2, rel=1e-12)  # CN12 weight: the Sr site of 5
    assert fingerprint[45] == pytest.approx(0.2, rel=1e-12)  # cuboctahedral


def test_structure_fingerprints_of_perov5_test_structures_match_matminer(shared_data):
    frame = pd.read_csv(shared_data / "perov_5" / "test.csv", index_col=0, nrows=3)
    featurizer = CrystalNNFingerprint()
    for cif, (total, l_shaped, cn3) in zip(frame["cif"], STRUCTURE_PINS):
        fingerprint = featurizer.structure(Structure.from_str(cif, fmt="cif"))
        assert fingerprint.sum() == pytest.approx(total, rel=1e-10)
        assert fingerprint[2] == pytest.approx(l_shaped, rel=1e-10)
        assert fingerprint[12] == pytest.approx(cn3, rel=1e-10)


def test_composition_scaler_is_cdvaes_fixed_one():
    scaler = CompositionScaler.cdvae()
    # First and last of CDVAE's CompScalerMeans / CompScalerStds (cdvae/common/constants.py).
    assert scaler.means.shape == scaler.stds.shape == (132,)
    assert scaler.means[0] == 21.194441759304013
    assert np.all(scaler.stds > 0)
    assert not hasattr(CompositionScaler, "fit")  # nothing is ever fitted on evaluated data


def test_metrics_use_the_fixed_scaler_whatever_the_test_set():
    gen, test = _srtio3(), _srtio3(3.99, "Zr")
    fixed = CompositionScaler.cdvae().transform(
        np.stack([composition_fingerprint(gen.composition), composition_fingerprint(test.composition)]))
    expected = float(np.linalg.norm(fixed[0] - fixed[1]))
    # A scaler fitted on a one-structure test set would map it to 0 and give another distance.
    metrics = cdvae_metrics([gen], [test], "perov_5")
    assert metrics["amcd_precision"] == pytest.approx(expected, rel=1e-12)
    assert metrics["amcd_recall"] == pytest.approx(expected, rel=1e-12)
    # More test structures can only bring a nearer one; the distance to `test` is unchanged.
    more = cdvae_metrics([gen], [test, _srtio3(4.2, "Hf"), _srtio3(3.95, "Ge")], "perov_5")
    assert more["amcd_precision"] <= expected + 1e-12
    assert (metrics["struct_cutoff"], metrics["comp_cutoff"]) == COV_CUTOFFS["perov_5"]
    # CDVAE's COV_Cutoffs (scripts/compute_metrics.py).
    assert COV_CUTOFFS == {"perov_5": (0.2, 4.0), "carbon_24": (0.2, 4.0), "mp_20": (0.4, 10.0)}


def test_wasserstein_distances_use_a_seeded_subset_of_valid_structures():
    generated = [_srtio3(a) for a in (3.8, 3.9, 4.0, 4.1)]
    test = [_srtio3(3.95)]
    first = cdvae_metrics(generated, test, "perov_5", wdist_samples=2)
    assert first["wdist_samples"] == 2
    assert first == cdvae_metrics(generated, test, "perov_5", wdist_samples=2)
    assert cdvae_metrics(generated, test, "perov_5")["wdist_samples"] == 4  # fewer than 1,000: all


def test_reference_data_ship_as_package_data():
    data = REPO_ROOT / "evaluation" / "data"
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "xtalgen.evaluation.data" in config["packages"]
    assert config["package-data"]["xtalgen.evaluation.data"] == ["*"]
    for name in ("magpie_elements.csv", "cdvae_comp_scaler.json", "README.md", "CDVAE_LICENSE", "MATMINER_LICENSE"):
        assert (data / name).is_file(), name
    assert sum(p.stat().st_size for p in data.iterdir()) < 40_000
    scaler = json.loads((data / "cdvae_comp_scaler.json").read_text())
    assert len(scaler["means"]) == len(scaler["stds"]) == 132
    assert magpie_source().startswith("magpie-")


@pytest.mark.slow
def test_parity_with_matminer_in_its_own_environment(shared_data, tmp_path):
    """Builds (or reuses) build/matminer-venv with matminer and compares everything bit for bit."""
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "cdvae_parity.py"), "--n", "12",
                          "--data", str(shared_data)], capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["parity"] and report["magpie_table_identical"]
    assert report["comp_fp_identical"] == report["struct_fp_identical"] == 24
