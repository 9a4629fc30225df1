"""A band-gap predictor to judge generated Perov-5-like crystals, refit from val.csv whenever needed.

    python benchmarks/band_gap_predictor.py --train ../shared/data/perov_5/val.csv \
        --test ../shared/data/perov_5/test.csv

Features (`featurise`), from the Magpie table the package ships (evaluation/cdvae_metrics.py):
* the Magpie composition fingerprint (132 numbers; NaN kept, the trees handle it);
* structure: volume per atom, density, mean and minimum nearest-neighbour distance;
* sites: the most electronegative 60% of the sites are taken as anions (X of ABX3), the rest as
  cations; B = the cation closest on average to the anions, A = the farthest. Magpie properties of A,
  of B and the mean over the anions, the mean A-X and B-X distances, and a charge balance from
  pymatgen's common oxidation states (anion charge, cations' max / min positive sum, and the smallest
  |cation sum - anion charge| over the cations' states). These are what the gap depends on most in
  Perov-5 and they are defined for any structure with 2+ atoms (NaN otherwise).

Model: about 96% of Perov-5 has dir_gap == 0, so it is a hurdle model, both halves scikit-learn
histogram gradient boosting with a fixed random_state: P(gap > 0) from a
HistGradientBoostingClassifier times the gap from a HistGradientBoostingRegressor fitted on the
gapped structures only. Nothing is pickled or cached on disk: the fit (CIF parsing included) takes
seconds.

Caveat for a judge: only ~20 structures per split lie within 2.5-3.5 eV, and the overall MAE is
dominated by metals; the JSON line reports the MAE in that window separately, and that number is the
one that says how far a property-conditioning score can be trusted.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition, Element, Structure
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from xtalgen.evaluation.cdvae_metrics import MAGPIE_PROPERTIES, MAGPIE_STATS, composition_fingerprint

NN_CUTOFF = 6.0  # Å: neighbours searched within this radius (NaN when a site has none)
ANION_FRACTION = 0.6  # X3 of ABX3
STRUCTURE_FEATURES = ["volume_per_atom", "density", "mean_nn_distance", "min_nn_distance"]
SITE_FEATURES = (
    [f"A {p}" for p in MAGPIE_PROPERTIES] + [f"B {p}" for p in MAGPIE_PROPERTIES]
    + [f"X mean {p}" for p in MAGPIE_PROPERTIES]
    + ["A-X distance", "B-X distance", "anion charge", "cation max oxi sum", "cation min oxi sum",
       "charge mismatch"]
)
_MEAN = [i * len(MAGPIE_STATS) + MAGPIE_STATS.index("mean") for i in range(len(MAGPIE_PROPERTIES))]
_EN = MAGPIE_PROPERTIES.index("Electronegativity")


@cache
def _element(symbol: str) -> np.ndarray:
    """The 22 Magpie properties of one element (the "mean" statistics of its fingerprint)."""
    return composition_fingerprint(Composition(symbol))[_MEAN]


@cache
def _positive_states(symbol: str) -> tuple[int, ...]:
    return tuple(o for o in Element(symbol).common_oxidation_states if o > 0) or (0,)


def _site_features(s: Structure) -> list[float]:
    symbols = [sp.symbol for sp in s.species]
    if len(symbols) < 2:
        return [np.nan] * len(SITE_FEATURES)
    electronegativity = np.nan_to_num([_element(x)[_EN] for x in symbols], nan=-1.0)
    order = np.argsort(-electronegativity, kind="stable")
    n_anions = min(max(1, round(ANION_FRACTION * len(symbols))), len(symbols) - 1)
    anions, cations = order[:n_anions], order[n_anions:]
    to_anions = s.distance_matrix[np.ix_(cations, anions)].mean(axis=1)
    a, b = cations[np.argmax(to_anions)], cations[np.argmin(to_anions)]
    charge = -sum(min(Element(symbols[i]).common_oxidation_states or (0,)) for i in anions)
    sums = {0}  # every sum of the cations' positive common oxidation states
    for i in cations:
        sums = {x + o for x in sums for o in _positive_states(symbols[i])}
    return [
        *_element(symbols[a]), *_element(symbols[b]),
        *np.mean([_element(symbols[i]) for i in anions], axis=0),
        float(to_anions.max()), float(to_anions.min()), float(charge),
        float(sum(max(_positive_states(symbols[i])) for i in cations)),
        float(sum(min(_positive_states(symbols[i])) for i in cations)),
        float(min(abs(x - charge) for x in sums)),
    ]


def featurise(structures: list[Structure]) -> np.ndarray:
    """(n, 132 + 4 + 72): Magpie composition statistics, STRUCTURE_FEATURES, SITE_FEATURES; may hold NaN."""
    rows = []
    for s in structures:
        centres, _, _, distances = s.get_neighbor_list(NN_CUTOFF)
        keep = distances > 1e-8
        nn = np.full(len(s), np.nan)
        np.fmin.at(nn, centres[keep], distances[keep])  # nearest neighbour of each site (images included)
        finite = nn[np.isfinite(nn)]
        composition = s.composition
        structural = [
            s.volume / len(s),
            float(composition.weight) * 1.66053906660 / s.volume,  # g/cm³, as Structure.density
            float(finite.mean()) if finite.size else np.nan,
            float(finite.min()) if finite.size else np.nan,
        ]
        rows.append(np.concatenate([composition_fingerprint(composition), structural, _site_features(s)]))
    return np.asarray(rows, dtype=np.float64)


def read_split(csv_path: str | Path, target: str = "dir_gap") -> tuple[list[Structure], np.ndarray]:
    frame = pd.read_csv(csv_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF parser warns about rounded occupancies etc.
        structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    return structures, frame[target].to_numpy(dtype=np.float64)


class BandGapPredictor:
    """P(gap > 0) × gap-if-gapped; `predict` returns eV, never negative."""

    def __init__(self, classifier: HistGradientBoostingClassifier, regressor: HistGradientBoostingRegressor,
                 target: str, y_train: np.ndarray):
        self.classifier = classifier
        self.regressor = regressor
        self.target = target
        self.n_train = len(y_train)
        self.train_mean = float(y_train.mean())
        self.train_zero_fraction = float((y_train == 0).mean())

    def predict(self, structures: list[Structure]) -> np.ndarray:
        if not structures:
            return np.zeros(0)
        features = featurise(list(structures))
        with threadpool_limits(1, user_api="openmp"):  # see fit_predictor
            gapped = self.classifier.predict_proba(features)[:, list(self.classifier.classes_).index(True)]
            gap = self.regressor.predict(features)
        return gapped * np.clip(gap, 0.0, None)


def fit_predictor(train_csv: str | Path, target: str = "dir_gap", seed: int = 0) -> BandGapPredictor:
    structures, y = read_split(train_csv, target)
    features = featurise(structures)
    gapped = y > 0
    # One OpenMP thread: the fits take ~2 s so, while on a 2-core machine busy with other jobs the
    # default (a thread per core) spin-waits for cores and took 150 s. Results do not depend on it.
    with threadpool_limits(1, user_api="openmp"):
        classifier = HistGradientBoostingClassifier(random_state=seed).fit(features, gapped)
        regressor = HistGradientBoostingRegressor(random_state=seed).fit(features[gapped], y[gapped])
    return BandGapPredictor(classifier, regressor, target, y)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="CSV with cif and the target column (Perov-5 val.csv)")
    parser.add_argument("--test", required=True, help="CSV scored with the fitted predictor (Perov-5 test.csv)")
    parser.add_argument("--target", default="dir_gap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    predictor = fit_predictor(args.train, args.target, args.seed)
    fit_seconds = time.perf_counter() - start
    structures, y = read_split(args.test, args.target)
    start = time.perf_counter()
    pred = predictor.predict(structures)
    predict_seconds = time.perf_counter() - start
    err = np.abs(pred - y)
    window, predicted_in_window = (y >= 2.5) & (y <= 3.5), (pred >= 2.5) & (pred <= 3.5)
    gapped = y > 0
    report = {
        "benchmark": "band_gap_predictor",
        "train": str(args.train),
        "test": str(args.test),
        "target": args.target,
        "model": "HistGradientBoostingClassifier P(gap>0) x HistGradientBoostingRegressor on gapped, random_state="
                 f"{args.seed}",
        "features": f"magpie-132 + {'/'.join(STRUCTURE_FEATURES)} + {len(SITE_FEATURES)} A/B/X-site and charge-balance",
        "n_train": predictor.n_train,
        "n_test": len(y),
        "mae_ev": round(float(err.mean()), 4),
        "mae_predict_mean_ev": round(float(np.abs(predictor.train_mean - y).mean()), 4),
        "mae_predict_zero_ev": round(float(np.abs(y).mean()), 4),
        "r2": round(float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()), 4),
        "fraction_within_0.5ev": round(float((err <= 0.5).mean()), 4),
        "fraction_zero_gap_train": round(predictor.train_zero_fraction, 4),
        "fraction_zero_gap_test": round(float((y == 0).mean()), 4),
        "n_test_gap_2.5_3.5": int(window.sum()),
        "mae_gap_2.5_3.5_ev": round(float(err[window].mean()), 4) if window.any() else None,
        "mae_gap_nonzero_ev": round(float(err[gapped].mean()), 4) if gapped.any() else None,
        "fraction_gap_2.5_3.5_predicted_in_window": round(float(predicted_in_window[window].mean()), 4)
        if window.any() else None,
        "fraction_outside_window_predicted_in_window": round(float(predicted_in_window[~window].mean()), 4),
        "zero_gap_predicted_below_0.5ev": round(float((pred[~gapped] < 0.5).mean()), 4),
        "fit_seconds": round(fit_seconds, 2),  # CIF parsing + features + both fits
        "predict_seconds": round(predict_seconds, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
