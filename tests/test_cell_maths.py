"""evaluation/cell_maths.py: the fast 3x3 logm / expm_frechet and the memoised force evaluation that
are installed on ASE's FrechetCellFilter agree with SciPy and ASE, and relaxations do not change."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from ase.calculators.lj import LennardJones
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from xtalgen.evaluation import cell_maths
from xtalgen.evaluation.cell_maths import logm_3x3, speed_up_cell_filter


@pytest.fixture
def scipy_logm_calls(monkeypatch) -> list:
    """Counts the calls that reach scipy.linalg.logm (the fallback) while a test runs."""
    calls = []
    original = scipy.linalg.logm

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "logm", counted)
    return calls


def _rotation(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _assert_close_to_scipy(matrix: np.ndarray, rtol: float = 1e-12) -> None:
    expected = scipy.linalg.logm(matrix)
    got = logm_3x3(matrix)
    # SciPy's own logm is off by up to ~1e-13 relative on these (checked against 50-digit mpmath).
    assert np.linalg.norm(got - expected) <= rtol * np.linalg.norm(expected) + 1e-300


def test_logm_of_random_near_identity_deformations_matches_scipy(scipy_logm_calls):
    references = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        scale = [1e-12, 1e-6, 1e-3, 0.05, 0.2][seed % 5]
        matrix = np.eye(3) * rng.uniform(0.7, 1.4) + rng.normal(size=(3, 3)) * scale
        references.append((matrix, scipy.linalg.logm(matrix)))
    del scipy_logm_calls[:]
    for matrix, expected in references:
        assert np.linalg.norm(logm_3x3(matrix) - expected) <= 1e-12 * np.linalg.norm(expected)
    assert not scipy_logm_calls  # all on the fast route


def test_logm_of_isotropic_and_nearly_isotropic_cells(scipy_logm_calls):
    s = 1.037
    isotropic = s * np.eye(3)
    np.testing.assert_array_equal(logm_3x3(isotropic), np.log(s) * np.eye(3))
    # s I plus a tiny non-normal (triangular) part: a (nearly) defective matrix, where an
    # eigendecomposition loses everything; the log's off-diagonal must keep full relative accuracy.
    for perturbation in (1e-9, 1e-13):
        matrix = isotropic + np.triu(np.ones((3, 3)), 1) * perturbation
        matrix[2, 1] = 0.5 * perturbation  # not triangular either
        _assert_close_to_scipy(matrix)
        # Entry by entry against the series log(s) I + X - X^2/2 + X^3/3, X = (F - s I)/s, ||X|| ~ 1e-9:
        # SciPy's logm is only accurate relative to ||log F|| here (off by 4e-8 in the 1e-9 entries).
        x = (matrix - isotropic) / s
        series = np.log(s) * np.eye(3) + x - x @ x / 2 + x @ x @ x / 3
        np.testing.assert_allclose(logm_3x3(matrix), series, rtol=1e-14, atol=0)
    exactly_identity_plus = np.eye(3) + np.array([[0, 1e-9, 0], [0, 0, 2e-9], [0, 0, 0]])
    x = exactly_identity_plus - np.eye(3)
    np.testing.assert_allclose(logm_3x3(exactly_identity_plus), x - x @ x / 2, rtol=1e-14, atol=0)
    _assert_close_to_scipy(exactly_identity_plus)
    assert len(scipy_logm_calls) == 3  # the references only


def test_logm_of_strong_rotation_and_shear_takes_square_roots(scipy_logm_calls):
    cases = [_rotation(170.0), np.array([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
             np.diag([0.3, 1.0, 4.0]) @ np.array([[1.0, 0.3, 0.1], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])]
    for matrix in cases:
        _assert_close_to_scipy(matrix)
    assert len(scipy_logm_calls) == len(cases)  # the references only: no fallback


def test_logm_with_a_negative_eigenvalue_falls_back_to_scipy(scipy_logm_calls):
    for matrix in (np.diag([-1.0, 2.0, 3.0]), np.diag([-1.0, -2.0, 3.0]), 1.1 * _rotation(180.0)):
        np.testing.assert_array_equal(logm_3x3(matrix), scipy.linalg.logm(matrix))
    assert len(scipy_logm_calls) == 6  # each matrix: once as the fallback, once as the reference
    assert np.iscomplexobj(logm_3x3(np.diag([-1.0, 2.0, 3.0])))  # as SciPy: no real principal log


def test_expm_frechet_matches_scipy_in_every_direction():
    maths = cell_maths._CellMaths(_utility_of_a_filter())
    rng = np.random.default_rng(0)
    for scale in (1e-12, 1e-3, 0.1, 0.6):
        a = rng.normal(size=(3, 3)) * scale
        for k in range(9):
            direction = np.zeros((3, 3))
            direction.flat[k] = 1.0
            expected = scipy.linalg.expm_frechet(a, direction, compute_expm=False)
            got = maths.expm_frechet(a, direction, compute_expm=False)
            np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
            got[:] = 0.0  # a copy: the cache is untouched
            np.testing.assert_allclose(maths.expm_frechet(a, direction, compute_expm=False), expected,
                                       rtol=1e-13, atol=1e-15)
        other = rng.normal(size=(3, 3))  # not a unit direction: SciPy's answer, exactly
        np.testing.assert_array_equal(maths.expm_frechet(a, other, compute_expm=False),
                                      scipy.linalg.expm_frechet(a, other, compute_expm=False))
        unit = np.zeros((3, 3))
        unit[0, 0] = 1.0
        both = maths.expm_frechet(a, unit)  # compute_expm=True: SciPy's, (expm, derivative)
        for got, expected in zip(both, scipy.linalg.expm_frechet(a, unit), strict=True):
            np.testing.assert_array_equal(got, expected)


def _strained_lj_atoms():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = LennardJones(sigma=2.3, epsilon=0.1, rc=6.0, smooth=True)
    return atoms


def _utility_of_a_filter():
    return FrechetCellFilter(_strained_lj_atoms())._utility


def test_memoised_forces_are_the_unpatched_ones_and_never_aliased():
    atoms = _strained_lj_atoms()
    plain, fast = FrechetCellFilter(atoms), speed_up_cell_filter(FrechetCellFilter(atoms))
    atoms.set_cell(atoms.cell.array @ np.array([[1.03, 0.02, 0.0], [0.0, 0.98, 0.01], [0.0, 0.0, 1.01]]),
                   scale_atoms=True)
    maths = fast._utility._xtalgen_cell_maths
    inputs = {"atoms_forces": atoms.get_forces(), "stress": atoms.get_stress(), "cell": atoms.get_cell(),
              "exp_cell_factor": fast.exp_cell_factor}
    ase_forces, ase_stress = plain._utility.get_forces_frechet(**inputs)  # SciPy's maths, unmemoised
    exact_forces, exact_stress = maths.get_forces_frechet_unpatched(**inputs)  # fast maths, unmemoised
    for _ in range(3):
        forces, stress = fast._utility.get_forces_frechet(**inputs)
        np.testing.assert_array_equal(forces, exact_forces)  # the memo is bit-exact
        np.testing.assert_array_equal(stress, exact_stress)
        np.testing.assert_allclose(forces, ase_forces, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(stress, ase_stress, rtol=1e-12, atol=1e-14)
        forces[:] = 1e9  # mutating a result changes nothing the next call returns
        stress[:] = 1e9
    np.testing.assert_allclose(fast.get_forces(), plain.get_forces(), rtol=1e-12, atol=1e-14)  # through ASE
    moved = {**inputs, "exp_cell_factor": 2.0 * fast.exp_cell_factor}  # new inputs: computed afresh
    np.testing.assert_array_equal(fast._utility.get_forces_frechet(**moved)[0],
                                  maths.get_forces_frechet_unpatched(**moved)[0])


def test_a_filter_without_a_cell_utility_is_left_alone():
    class Other:
        pass

    other = Other()
    assert speed_up_cell_filter(other) is other and vars(other) == {}
    cell_filter = speed_up_cell_filter(FrechetCellFilter(_strained_lj_atoms()))
    installed = cell_filter._utility.expm_frechet
    assert speed_up_cell_filter(cell_filter) is cell_filter
    assert cell_filter._utility.expm_frechet == installed  # not wrapped twice


def _relax_perov_with_lj(cif: str, fast: bool):
    atoms = AseAtomsAdaptor.get_atoms(Structure.from_str(cif, fmt="cif"))
    atoms.calc = LennardJones(sigma=2.2, epsilon=0.1, rc=6.0, smooth=True)
    cell_filter = FrechetCellFilter(atoms)
    if fast:
        speed_up_cell_filter(cell_filter)
    optimizer = FIRE(cell_filter, logfile=None)
    converged = optimizer.run(fmax=0.05, steps=50)
    return optimizer.nsteps, converged, atoms.cell.array.copy(), atoms.positions.copy()


def test_lennard_jones_relaxations_of_perovskites_are_unchanged(shared_data):
    frame = pd.read_csv(shared_data / "perov_5" / "test.csv", nrows=3)
    for cif in frame["cif"]:
        before = _relax_perov_with_lj(cif, fast=False)
        after = _relax_perov_with_lj(cif, fast=True)
        assert after[:2] == before[:2]  # same number of steps, same convergence
        np.testing.assert_allclose(after[2], before[2], rtol=0, atol=1e-8)  # cell (Å)
        np.testing.assert_allclose(after[3], before[3], rtol=0, atol=1e-8)  # positions (Å)
        assert np.abs(after[2] - np.asarray(AseAtomsAdaptor.get_atoms(
            Structure.from_str(cif, fmt="cif")).cell)).max() > 0.1  # the cell really moved


def test_every_relaxation_path_of_the_evaluator_uses_the_fast_filter(shared_data, scipy_logm_calls):
    """CHGNet's StructOptimizer (given our filter), the batched relaxation and the ASE-calculator
    potential: on these near-cubic cells no logm reaches SciPy (an unpatched filter calls it each step)."""
    from xtalgen.evaluation.relax import ASECalculatorPotential, load_potential

    frame = pd.read_csv(shared_data / "perov_5" / "test.csv", nrows=2)
    structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    chgnet = load_potential("chgnet")
    assert chgnet.relax(structures[0], steps=3).steps == 3
    assert sorted(position for position, _ in chgnet.relax_batch(structures, steps=3, concurrency=2)) == [0, 1]
    lennard_jones = ASECalculatorPotential(LennardJones(sigma=2.2, epsilon=0.1, rc=6.0, smooth=True), "lj")
    assert lennard_jones.relax(structures[1], steps=3).steps == 3
    assert not scipy_logm_calls
    plain = FrechetCellFilter(AseAtomsAdaptor.get_atoms(structures[0]))
    plain.get_positions()
    assert len(scipy_logm_calls) == 1  # the check can fail: an unpatched filter is counted
