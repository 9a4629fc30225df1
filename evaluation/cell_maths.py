"""Fast 3x3 matrix functions for ASE's `FrechetCellFilter`, installed per filter.

Why this is hand-written: a `FrechetCellFilter` works on the matrix logarithm of the cell's 3x3
deformation gradient F. Each optimizer step (ASE 3.29) calls SciPy's `logm` twice (positions; forces)
and `expm_frechet` 9 times per force evaluation, and the force evaluation itself runs ~3 times per
step with identical inputs (FIRE's step, the convergence check, ...). SciPy's matrix functions are
general n x n algorithms (Schur forms, norm estimates, many small NumPy calls): for a 3x3 matrix
their cost is almost all Python overhead, ~0.85-1.1 ms per `logm` and ~80-90 us per `expm_frechet`
(measured), about a fifth of a CHGNet relaxation step's CPU on 5-atom Perov-5 cells. No library we
know of offers small-fixed-size versions, so this module supplies them, each checked and falling
back to SciPy itself:

* `logm_3x3`: F = s (I + X) with s = trace(F) / 3, so that X is small for the near-isotropic
  deformations of a relaxation (a cubic cell gives F = s I + rounding, whose near-degenerate,
  non-normal eigenvalues make an eigendecomposition inaccurate, so none is used). Then
  log F = log(s) I + log(I + X), the second term from the [12/12] Pade approximant in partial
  fractions, sum_j w_j X (I + t_j X)^-1 (Gauss-Legendre nodes t_j and weights w_j on [0, 1]), which
  is exact to ~1e-16 relative for ||X||_2 <= 0.5 (Kenney & Laub's bound: the error is largest at
  x = -||X||). Larger X (strong shear, rotation) first take square roots (Denman-Beavers
  iteration; the inverse scaling and squaring of SciPy's own algorithm). Every result is verified:
  expm of it must give F back to 1e-12 relative, and a square-root result must be the principal
  logarithm (eigenvalues' imaginary parts inside (-pi, pi)); F with an eigenvalue on the closed
  negative real axis, non-finite or non-3x3 input, or a failed check go to `scipy.linalg.logm`.
* `expm_frechet`: ASE asks for the Frechet derivative of expm at A = log F in the 9 unit directions
  E_mn, one after the other, with the same A. On a new A all 9 come from one stacked
  `scipy.linalg.expm` of the (9, 6, 6) block matrices [[A, E_mn], [0, A]] (their upper-right block
  is the derivative), cached per filter, one entry; anything else (another E, compute_expm=True)
  goes to `scipy.linalg.expm_frechet`.
* `get_forces_frechet` keeps its last inputs and outputs (one entry) and returns copies of the
  outputs when called again with the same forces, stress, cell and factor: bit-exact.

`speed_up_cell_filter(filter)` installs the three on `filter._utility` (ASE >= 3.25's `CellUtility`);
a filter without one is left as it is. The state lives in that filter only (no global cache), so
filters relaxed in parallel threads (batched_relax) do not interfere.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

# [12/12] Pade approximant of log(1 + x) in partial fractions: log(1 + x) = int_0^1 x / (1 + t x) dt
# by 12-point Gauss-Legendre quadrature. Error / |log| <= ~1e-16 for |x| <= 0.5 (scalar worst case
# x = -0.5, checked in 40-digit arithmetic), so by Kenney & Laub also for ||X||_2 <= 0.5.
_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(12)
_PADE_NODES = ((_GAUSS_X + 1.0) / 2.0)[:, None, None]
_PADE_WEIGHTS = _GAUSS_W / 2.0
_PADE_THETA = 0.5
_MAX_SQUARE_ROOTS = 8  # a rotation by 170 degrees needs 4
_VERIFY_RTOL = 1e-12  # ||expm(L) - F||_F <= this * ||F||_F, else SciPy's logm
_EYE = np.eye(3)


def _norm2_bound(x: np.ndarray) -> float:
    """The Frobenius norm, an upper bound of the spectral norm."""
    flat = x.ravel()
    return math.sqrt(float(flat @ flat))


def _log_near_identity(x: np.ndarray) -> np.ndarray:
    """log(I + x) for ||x||_2 <= 0.5: sum_j w_j (I + t_j x)^-1 x (the factors commute)."""
    return (_PADE_WEIGHTS @ np.linalg.inv(_EYE + _PADE_NODES * x).reshape(-1, 9)).reshape(3, 3) @ x


def _sqrtm_denman_beavers(a: np.ndarray) -> np.ndarray | None:
    """Principal square root (product form of the Denman-Beavers iteration), None if it stalls."""
    m, y = a, a
    for _ in range(60):
        m_inv = np.linalg.inv(m)
        y = y @ (_EYE + m_inv) / 2.0
        m = (_EYE + (m + m_inv) / 2.0) / 2.0
        if np.abs(m - _EYE).max() <= 1e-15:
            return y
    return None


def _logm_candidate(f: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """(log F, came through square roots) or None when this route does not apply."""
    s = float(np.trace(f)) / 3.0
    if s > 0.0:
        # (F - s I) / s: the diagonal subtraction is exact near s (Sterbenz), so a small X keeps
        # full relative accuracy instead of the absolute eps of F / s - I.
        x = (f - s * _EYE) / s
        if _norm2_bound(x) <= _PADE_THETA:
            return math.log(s) * _EYE + _log_near_identity(x), False
    eigenvalues = np.linalg.eigvals(f)
    if np.any((eigenvalues.real <= 0.0) & (np.abs(eigenvalues.imag) <= 1e-8 * np.abs(eigenvalues))):
        return None  # no real principal logarithm (or an ill-conditioned one): SciPy decides
    s = float(np.prod(np.abs(eigenvalues))) ** (1.0 / 3.0)
    if not (s > 0.0 and math.isfinite(s)):
        return None
    a = f / s
    roots = 0
    while _norm2_bound(a - _EYE) > _PADE_THETA:
        if roots == _MAX_SQUARE_ROOTS:
            return None
        a = _sqrtm_denman_beavers(a)
        if a is None:
            return None
        roots += 1
    return math.log(s) * _EYE + (2.0**roots) * _log_near_identity(a - _EYE), roots > 0


def logm_3x3(matrix, disp: bool = True):
    """`scipy.linalg.logm` for a real 3x3 matrix with a real principal logarithm, ~20x faster;
    other input, and any result that fails its checks, goes to SciPy (see the module docstring)."""
    f = np.asarray(matrix)
    if not disp or f.shape != (3, 3) or f.dtype.kind != "f" or not np.isfinite(f).all():
        return scipy.linalg.logm(matrix, disp=disp)
    f = f.astype(np.float64, copy=False)
    try:
        with np.errstate(all="ignore"):  # a square-root iteration that diverges is a failed check
            candidate = _logm_candidate(f)
    except (np.linalg.LinAlgError, FloatingPointError):  # singular iterate
        candidate = None
    if candidate is not None:
        log, through_roots = candidate
        if np.isfinite(log).all():
            residual = np.linalg.norm(scipy.linalg.expm(log) - f)
            principal = not through_roots or bool(np.all(np.abs(np.linalg.eigvals(log).imag) < math.pi))
            if principal and residual <= _VERIFY_RTOL * np.linalg.norm(f):
                return log
    return scipy.linalg.logm(matrix, disp=disp)


class _CellMaths:
    """The per-filter state: the last A's 9 Frechet derivatives, the last force evaluation."""

    def __init__(self, utility):
        self.utility = utility
        self.get_forces_frechet_unpatched = utility.get_forces_frechet
        self._frechet = None  # (A's bytes, (9, 3, 3) derivatives in the unit directions)
        self._forces = None  # (key, (forces, convergence stress))

    # --- expm_frechet -----------------------------------------------------------------------
    def expm_frechet(self, A, E, method=None, compute_expm=True, check_finite=True):
        a, e = np.asarray(A), np.asarray(E)
        direction = self._unit_direction(e)
        if (compute_expm or method is not None or direction is None or a.shape != (3, 3)
                or a.dtype != np.float64 or not np.isfinite(a).all()):
            return scipy.linalg.expm_frechet(A, E, method=method, compute_expm=compute_expm,
                                             check_finite=check_finite)
        key = a.tobytes()
        cached = self._frechet
        if cached is None or cached[0] != key:
            blocks = np.zeros((9, 6, 6))
            blocks[:, :3, :3] = a
            blocks[:, 3:, 3:] = a
            blocks[np.arange(9), np.arange(9) // 3, 3 + np.arange(9) % 3] = 1.0
            cached = (key, scipy.linalg.expm(blocks)[:, :3, 3:])
            self._frechet = cached  # one assignment: a reader sees the old pair or the new one
        return cached[1][direction].copy()

    @staticmethod
    def _unit_direction(e: np.ndarray) -> int | None:
        """k when e is the 3x3 matrix with a single 1.0 at flat index k and zeros elsewhere."""
        if e.shape != (3, 3) or e.dtype.kind not in "fiu":
            return None
        flat = e.ravel()
        k = int(np.argmax(flat != 0))
        if flat[k] != 1 or np.count_nonzero(flat) != 1:
            return None
        return k

    # --- get_forces_frechet -----------------------------------------------------------------
    def get_forces_frechet(self, atoms_forces, stress, cell, exp_cell_factor):
        u = self.utility
        arrays = [np.asarray(a) for a in (atoms_forces, stress, cell, u.orig_cell, u.mask3x3)]
        key = (
            tuple((a.shape, a.dtype.str, a.tobytes()) for a in arrays),
            float(exp_cell_factor), float(u.scalar_pressure), bool(u.hydrostatic_strain), bool(u.constant_volume),
        )
        cached = self._forces
        if cached is None or cached[0] != key:
            forces, stress_out = self.get_forces_frechet_unpatched(atoms_forces, stress, cell, exp_cell_factor)
            cached = (key, (np.array(forces, copy=True), np.array(stress_out, copy=True)))
            self._forces = cached
        forces, stress_out = cached[1]
        return forces.copy(), stress_out.copy()


def speed_up_cell_filter(cell_filter):
    """Install the fast matrix functions on an ASE FrechetCellFilter; return the filter.

    Acts on `cell_filter._utility` (ASE's CellUtility); a filter without one, or whose utility
    lacks the attributes replaced here (another ASE version), is returned untouched. Calling it
    twice on one filter does nothing more.
    """
    utility = getattr(cell_filter, "_utility", None)
    needed = ("logm", "expm_frechet", "get_forces_frechet", "orig_cell", "mask3x3", "scalar_pressure",
              "hydrostatic_strain", "constant_volume")
    if utility is None or getattr(utility, "_xtalgen_cell_maths", None) is not None:
        return cell_filter
    if not all(hasattr(utility, name) for name in needed):
        return cell_filter
    maths = _CellMaths(utility)
    utility.logm = logm_3x3
    utility.expm_frechet = maths.expm_frechet
    utility.get_forces_frechet = maths.get_forces_frechet
    utility._xtalgen_cell_maths = maths
    return cell_filter


def frechet_cell_filter(atoms, **kwargs):
    """`ase.filters.FrechetCellFilter(atoms, **kwargs)` with `speed_up_cell_filter` applied; usable
    as CHGNet's `StructOptimizer.relax(ase_filter=...)`."""
    from ase.filters import FrechetCellFilter

    return speed_up_cell_filter(FrechetCellFilter(atoms, **kwargs))
