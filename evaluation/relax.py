"""Relaxation with a machine-learning interatomic potential, chosen by name from a registry.

`chgnet` (the default) ships its weights in its wheel and relaxes with its own
`chgnet.model.StructOptimizer` (FIRE + FrechetCellFilter; every FrechetCellFilter made here gets
cell_maths' fast 3x3 matrix functions). Other potentials plug in by name:
`mace` (mace-torch's `mace_mp`) and `mattersim` are registered when their packages are installed,
and `register_potential` adds any ASE calculator. `relax_many` runs a list of structures over a
pool of processes, each loading the potential once, and yields results as they finish so that the
caller can append them to a resumable log. `on_step` reports each energy-and-forces evaluation of a
structure as it happens (from the pool's workers too), so that a long relaxation shows progress.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import io
import math
import multiprocessing as mp
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

from pymatgen.core import Structure

from xtalgen.evaluation.cell_maths import frechet_cell_filter
from xtalgen.evaluation.physical import check_relaxation_volume, volume_per_atom
from xtalgen.evaluation.relax_result import RelaxResult, displacement_rmsd, relax_result

MP2020_FOOTING = "MP2020-corrected GGA/GGA+U"


@contextlib.contextmanager
def cpu_threads(torch_threads: int = 1) -> Iterator[None]:
    """Limit torch's and BLAS's threads while a potential runs, flush subnormal floats to zero in
    this thread, then restore both (flushing to the process default: off).

    The graphs are small (tens of atoms) and the cell filter's matrix functions are 6x6: threads
    only add synchronisation, and on a busy machine OpenBLAS's spinning threads made each
    relaxation step ~6x slower (measured). Parallelism comes from processes instead (`relax_many`).
    Subnormal numbers (below 1.2e-38 in float32: far tails of a potential's radial bases) are
    computed many times slower by CPUs; flushing them made CHGNet's relaxation steps 1.33x cheaper,
    with the same energies and step counts (benchmarks/RESULTS.md, "Evaluation cost").
    """
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)  # per thread: batched_relax sets it in its own threads too
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous)


class Potential(abc.ABC):
    """Interface of an interatomic potential used by the evaluator."""

    name = "base"
    # What the potential's energies are fitted to. Energies above a hull of DFT entries (--hull)
    # only mean something when the two agree; see hull.py.
    energy_footing = "unknown"

    @abc.abstractmethod
    def relax(
        self, structure: Structure, fmax: float = 0.05, steps: int = 500, relax_cell: bool = True
    ) -> RelaxResult: ...

    @abc.abstractmethod
    def energies_per_atom(self, structures: Sequence[Structure]) -> list[float]:
        """Single-point energies (eV/atom), no relaxation."""


class CHGNetPotential(Potential):
    """CHGNet 0.4.x (weights ship in the wheel) through its own StructOptimizer."""

    name = "chgnet"
    # CHGNet is fitted to MPtrj energies with the Materials Project 2020 corrections applied.
    energy_footing = MP2020_FOOTING

    def __init__(self, device: str = "cpu", batch_size: int = 4, threads: int = 1):
        from chgnet.model import CHGNet, StructOptimizer

        # CHGNet 0.4.2 converts a grad-tracking tensor to a scalar on every call, and torch warns
        # about it each time a process first relaxes: noise in every evaluation's console.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its banner on load
            self.model = CHGNet.load(verbose=False, use_device=device)
            self.calculator = _guarded_chgnet_calculator(self.model, device)
            self.optimizer = StructOptimizer(model=self.calculator)
        self.batch_size = batch_size
        self.threads = threads
        # CHGNet's default filter with cell_maths' fast 3x3 functions, where relax takes a filter (0.4.2 does).
        takes_filter = "ase_filter" in inspect.signature(self.optimizer.relax).parameters
        self._filter = {"ase_filter": frechet_cell_filter} if takes_filter else {}

    def energies_per_atom(self, structures: Sequence[Structure]) -> list[float]:
        if not structures:
            return []
        with cpu_threads(self.threads):
            predictions = self.model.predict_structure(
                list(structures), task="e", batch_size=self.batch_size, return_site_energies=False
            )
        if isinstance(predictions, dict):  # one structure → one dict
            predictions = [predictions]
        return [float(p["e"]) for p in predictions]

    def relax(
        self, structure: Structure, fmax: float = 0.05, steps: int = 500, relax_cell: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> RelaxResult:
        self.calculator.start_volume_per_atom = volume_per_atom(structure)
        self.calculator.on_step = on_step
        try:
            with cpu_threads(self.threads):
                output = self.optimizer.relax(
                    structure.copy(), fmax=fmax, steps=steps, relax_cell=relax_cell, verbose=False, **self._filter
                )
        finally:
            self.calculator.on_step = None
        relaxed: Structure = output["final_structure"]
        magmoms = [float(m) for m in relaxed.site_properties.get("magmom", [])]
        return relax_result(structure, relaxed, output["trajectory"].energies, steps, magmoms)


    def relax_batch(
        self, structures: Sequence[Structure], fmax: float = 0.05, steps: int = 500, concurrency: int = 8,
        on_step: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, RelaxResult | Exception]]:
        """Relax many structures with one batched model call per step (see batched_relax.py);
        yields (position, result or exception) as each finishes; on_step(position) per evaluation."""
        from xtalgen.evaluation.batched_relax import relax_batched

        with cpu_threads(self.threads):
            yield from relax_batched(self, structures, fmax=fmax, steps=steps, concurrency=concurrency,
                                     on_step=on_step)


def _guarded_chgnet_calculator(model, device: str):
    """CHGNet's ASE calculator, stopping a relaxation whose cell runs away (see physical.py)."""
    from chgnet.model.dynamics import CHGNetCalculator

    class GuardedCHGNetCalculator(CHGNetCalculator):
        start_volume_per_atom = float("nan")  # set before each relaxation
        on_step: Callable[[], None] | None = None  # progress, set for the length of one relaxation

        def calculate(self, atoms=None, *args, **kwargs):
            if atoms is not None and math.isfinite(self.start_volume_per_atom):
                check_relaxation_volume(self.start_volume_per_atom, atoms.get_volume() / len(atoms))
            if self.on_step is not None:
                self.on_step()
            return super().calculate(atoms, *args, **kwargs)

    return GuardedCHGNetCalculator(model=model, use_device=device)


class ASECalculatorPotential(Potential):
    """Any ASE calculator, relaxed with ASE's FIRE on a FrechetCellFilter (cell + positions)."""

    def __init__(self, calculator, name: str = "ase", threads: int = 1):
        self.calculator = calculator
        self.name = name
        self.threads = threads

    def _atoms(self, structure: Structure):
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = self.calculator
        return atoms

    def energies_per_atom(self, structures: Sequence[Structure]) -> list[float]:
        with cpu_threads(self.threads):
            return [float(self._atoms(s).get_potential_energy()) / len(s) for s in structures]

    def relax(
        self, structure: Structure, fmax: float = 0.05, steps: int = 500, relax_cell: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> RelaxResult:
        from ase.optimize import FIRE
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = self._atoms(structure)
        n_atoms = len(structure)
        with cpu_threads(self.threads):
            initial_energy = float(atoms.get_potential_energy()) / n_atoms
            optimizer = FIRE(frechet_cell_filter(atoms) if relax_cell else atoms, logfile=None)
            start = volume_per_atom(structure)
            optimizer.attach(lambda: check_relaxation_volume(start, atoms.get_volume() / n_atoms), interval=1)
            if on_step is not None:
                optimizer.attach(on_step, interval=1)
            converged = bool(optimizer.run(fmax=fmax, steps=steps))
        relaxed = AseAtomsAdaptor.get_structure(atoms)
        with contextlib.suppress(Exception):  # not every calculator computes magnetic moments
            relaxed.add_site_property("magmom", [float(m) for m in atoms.get_magnetic_moments()])
        return RelaxResult(
            structure=relaxed,
            energy_per_atom=float(atoms.get_potential_energy()) / n_atoms,
            initial_energy_per_atom=initial_energy,
            converged=converged,
            steps=int(optimizer.nsteps),
            rmsd=displacement_rmsd(structure, relaxed),
            magmoms=[float(m) for m in relaxed.site_properties.get("magmom", [])],
        )


def _mace_factory(device: str = "cpu", threads: int = 1, **_) -> Potential:
    from mace.calculators import mace_mp

    calculator = mace_mp(model="medium", device=device, default_dtype="float64")
    return ASECalculatorPotential(calculator, "mace", threads)


def _mattersim_factory(device: str = "cpu", threads: int = 1, **_) -> Potential:
    from mattersim.forcefield import MatterSimCalculator

    return ASECalculatorPotential(MatterSimCalculator(device=device), "mattersim", threads)


POTENTIALS: dict[str, Callable[..., Potential]] = {
    "chgnet": lambda device="cpu", **kw: CHGNetPotential(device=device, **kw),
    "mace": _mace_factory,
    "mattersim": _mattersim_factory,
}


def register_potential(name: str, factory: Callable[..., Potential]) -> None:
    """Make `evaluate.potential=<name>` load `factory(device=...)` (e.g. an ASECalculatorPotential)."""
    POTENTIALS[name] = factory


def load_potential(name: str, device: str = "cpu", **kwargs) -> Potential:
    if name not in POTENTIALS:
        raise ValueError(f"unknown potential {name!r}; registered: {sorted(POTENTIALS)}")
    try:
        return POTENTIALS[name](device=device, **kwargs)
    except ImportError as exc:
        raise ValueError(f"potential {name!r} is not installed here ({exc})") from exc


# --- parallel relaxation ----------------------------------------------------------------------
_WORKER_POTENTIAL: Potential | None = None
_WORKER_STEPS = None  # a multiprocessing queue of structure indices, one per evaluation, or None


def _init_worker(name: str, threads: int, steps=None) -> None:
    global _WORKER_POTENTIAL, _WORKER_STEPS
    _WORKER_POTENTIAL = load_potential(name, threads=threads)
    _WORKER_STEPS = steps


def _relax_task(task: tuple[list[int], list[dict], float, int, int]) -> list[tuple[int, dict | None, str]]:
    indices, structure_dicts, fmax, steps, batch = task
    structures = [Structure.from_dict(d) for d in structure_dicts]
    on_step = _WORKER_STEPS.put if _WORKER_STEPS is not None else None
    return [
        (index, result.to_json() if result is not None else None, error)
        for index, result, error in _relax_serial(_WORKER_POTENTIAL, list(zip(indices, structures)), fmax, steps,
                                                  batch, on_step)
    ]


def _takes_on_step(method) -> bool:
    """Whether a potential's relax/relax_batch reports steps (one registered from outside may not)."""
    try:
        return "on_step" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _relax_serial(model: Potential, structures, fmax: float, steps: int, batch: int,
                  on_step: Callable[[int], None] | None = None):
    """In this process: batched when the potential supports it, else one at a time."""
    if batch > 1 and hasattr(model, "relax_batch"):
        indices = [i for i, _ in structures]
        progress = {}
        if on_step is not None and _takes_on_step(model.relax_batch):
            progress = {"on_step": lambda position: on_step(indices[position])}
        outcomes = model.relax_batch([s for _, s in structures], fmax, steps, concurrency=batch, **progress)
        for position, outcome in outcomes:
            if isinstance(outcome, Exception):
                yield indices[position], None, f"{type(outcome).__name__}: {outcome}"
            else:
                yield indices[position], outcome, ""
        return
    reports = on_step is not None and _takes_on_step(model.relax)
    for index, structure in structures:
        progress = {"on_step": (lambda i=index: on_step(i))} if reports else {}
        try:
            yield index, model.relax(structure, fmax=fmax, steps=steps, **progress), ""
        except Exception as exc:  # one structure that breaks the potential must not stop the run
            yield index, None, f"{type(exc).__name__}: {exc}"


def relax_many(
    structures: Sequence[tuple[int, Structure]],
    potential: str | Potential = "chgnet",
    *,
    workers: int = 1,
    fmax: float = 0.05,
    steps: int = 500,
    batch: int = 8,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, RelaxResult | None, str]]:
    """Relax (index, structure) pairs; yield (index, result or None, error) in completion order.

    Each process relaxes up to `batch` structures together (one batched model call per optimizer
    step, for potentials with `relax_batch`). With `workers > 1` a pool of spawned processes each
    loads the potential once (by name) and runs single-threaded (see `cpu_threads`): one process
    per core is the fast layout. Results come back per chunk (at most 2 x batch structures), so
    `on_step(index)`, called at each energy-and-forces evaluation, is what shows progress meanwhile.
    """
    if workers <= 1 or len(structures) <= batch:
        model = load_potential(potential) if isinstance(potential, str) else potential
        yield from _relax_serial(model, list(structures), fmax, steps, batch, on_step)
        return
    if not isinstance(potential, str):
        raise ValueError("parallel relaxation needs the potential by registry name")
    chunk = max(1, min(2 * max(batch, 1), -(-len(structures) // workers)))  # every worker gets work
    tasks = [
        ([i for i, _ in structures[k : k + chunk]], [s.as_dict() for _, s in structures[k : k + chunk]], fmax, steps, batch)
        for k in range(0, len(structures), chunk)
    ]
    context = mp.get_context("spawn")  # fork after torch threads start can deadlock
    step_queue = context.Queue() if on_step is not None else None
    reader = None
    if step_queue is not None:
        def read_steps() -> None:
            for index in iter(step_queue.get, None):
                on_step(index)

        reader = threading.Thread(target=read_steps, daemon=True)
        reader.start()
    try:
        with context.Pool(workers, initializer=_init_worker, initargs=(potential, 1, step_queue)) as pool:
            for results in pool.imap_unordered(_relax_task, tasks, chunksize=1):
                for index, payload, error in results:
                    yield index, (RelaxResult.from_json(payload) if payload is not None else None), error
    finally:
        if step_queue is not None:
            step_queue.put(None)  # after the workers' own messages: the reader drains them, then stops
            reader.join(timeout=5)
