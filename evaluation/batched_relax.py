"""Relax several structures at once with CHGNet: one batched model call per optimizer step.

Each structure keeps its own ASE FIRE optimizer on a FrechetCellFilter, set up as CHGNet's own
`StructOptimizer` does it, but runs in its own thread. Whenever a thread needs energy, forces and
stress it hands its structure to a shared batcher and waits; once every running thread is waiting,
the batcher evaluates them all as one CHGNet graph batch and wakes them. Threads only interleave
the cheap optimizer arithmetic; the model runs in one call at a time, and the trajectories are
those of one-at-a-time relaxation (same steps, energies equal to float32 precision; tested).
A batch call that fails is redone one structure at a time, so a structure the model cannot take
(an element beyond CHGNet's 94) fails alone instead of taking its batch-mates down with it.
The gain is the per-call overhead: ~10 % on 5-atom Perov-5 cells on a CPU, where CHGNet's many
edges make each call compute-bound (measured 80 vs 88 ms per structure and step); more where calls
are latency-bound (GPUs).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from xtalgen.evaluation.cell_maths import frechet_cell_filter
from xtalgen.evaluation.physical import check_relaxation_volume, volume_per_atom
from xtalgen.evaluation.relax_result import RelaxResult, relax_result


class _Batcher:
    """Collects evaluation requests from optimizer threads; runs them together when all wait."""

    def __init__(self, model, active: int):
        self.model = model
        self.one_pass = _one_pass_supported()  # decided once, not at every batch
        self.active = active  # threads that may still ask for an evaluation
        self.pending: dict[int, Structure] = {}
        self.results: dict[int, dict | BaseException] = {}
        self.condition = threading.Condition()
        self._next_ticket = 0

    def evaluate(self, structure: Structure) -> dict:
        with self.condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self.pending[ticket] = structure
            self._run_if_all_waiting()
            while ticket not in self.results:
                self.condition.wait()
            result = self.results.pop(ticket)
        if isinstance(result, BaseException):
            raise result
        return result

    def finished(self) -> None:
        """A thread is done and will ask for nothing more."""
        with self.condition:
            self.active -= 1
            self._run_if_all_waiting()

    def _run_if_all_waiting(self) -> None:  # called with the lock held
        if not self.pending or len(self.pending) < self.active:
            return
        tickets = list(self.pending)
        structures = [self.pending.pop(t) for t in tickets]
        try:
            self.results.update(zip(tickets, self._predict(structures)))
        except Exception as exc:
            if len(structures) == 1:
                self.results[tickets[0]] = exc
            else:  # find the structure(s) at fault: each waiting thread gets its own result or error
                for ticket, structure in zip(tickets, structures):
                    try:
                        self.results[ticket] = self._predict([structure])[0]
                    except Exception as own:
                        self.results[ticket] = own
        self.condition.notify_all()

    def _predict(self, structures: list[Structure]) -> list[dict]:
        graphs = [self.model.graph_converter(s) for s in structures]
        if self.one_pass:
            return predict_efsm(self.model, graphs)
        predictions = self.model.predict_graph(graphs, task="efsm", batch_size=len(graphs))
        return [predictions] if isinstance(predictions, dict) else list(predictions)  # a bare dict for one graph


# predict_efsm reaches into CHGNet's internals (`_compute`, `BatchedGraph`): used with the version it
# was checked against bit for bit (the one requirements/ci.txt pins); any other takes predict_graph.
_ONE_PASS_CHGNET = ("0.4.2",)


def _one_pass_supported() -> bool:
    import chgnet

    return getattr(chgnet, "__version__", None) in _ONE_PASS_CHGNET


def predict_efsm(model, graphs: list) -> list[dict]:
    """`CHGNet.predict_graph(graphs, task="efsm")` in one batch, bit for bit, with one backward pass.

    CHGNet 0.4.2 takes forces and stress with two `torch.autograd.grad` calls (create_graph=True),
    each a backward pass over the whole graph: ~3/4 of a CPU step. Here one call takes the gradient
    with respect to positions and strains together. It keeps create_graph=True: without it the
    backward kernels differ and forces move by ~1e-5 relative (measured), so trajectories could
    drift. The energy `_compute` returns is already divided by the atom count (in place, for an
    intensive model); seeding its gradient with that count gives the exact ones of CHGNet's
    `energy.sum()` (n / n == 1 in IEEE arithmetic). Output: numpy e, f, s, m per graph, as
    predict_graph's. 5-atom Perov-5 cells, batches of 8: 275 -> 183 ms of CPU per batch.
    """
    from chgnet.model.model import BatchedGraph

    if model.training:
        model.eval()
    device = next(model.parameters()).device
    graphs = [g.to(device) for g in graphs]
    comp_energy = 0 if model.composition_model is None else model.composition_model(graphs)
    batched = BatchedGraph.from_graphs(
        graphs, bond_basis_expansion=model.bond_basis_expansion,
        angle_basis_expansion=model.angle_basis_expansion, compute_stress=True,
    )
    prediction = model._compute(batched, compute_force=False, compute_stress=False, compute_magmom=True)
    energy = prediction["e"]
    seed = prediction["atoms_per_graph"].to(energy.dtype) if model.is_intensive else torch.ones_like(energy)
    n = len(batched.atom_positions)
    grads = torch.autograd.grad(
        energy, [*batched.atom_positions, *batched.strains], grad_outputs=seed, create_graph=True
    )
    scale = 1 / batched.volumes * 160.21766208  # eV/Å³ → GPa, as CHGNet
    forces = [-1 * g for g in grads[:n]]
    stresses = [g * v for g, v in zip(grads[n:], scale)]
    energy = energy + comp_energy
    magmoms = prediction["m"]
    return [
        {key: tensor.cpu().detach().numpy() for key, tensor in zip("efsm", values)}
        for values in zip(energy, forces, stresses, magmoms)
    ]


class _BatchedCalculator(Calculator):
    """ASE calculator whose evaluations go through a `_Batcher` (results as CHGNetCalculator's)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "magmoms"]

    def __init__(self, batcher: _Batcher, stress_weight: float, start_volume_per_atom: float, on_step=None):
        super().__init__()
        self.batcher = batcher
        self.stress_weight = stress_weight  # GPa → eV/Å³, as CHGNetCalculator
        self.start_volume_per_atom = start_volume_per_atom  # of the input cell (runaway guard)
        self.on_step = on_step  # progress: called once per evaluation

    def check_state(self, atoms, tol=1e-15):
        """ASE's answer, quicker where nothing changed: ASE compares the atoms with `np.allclose` at
        every property read (~11 a step, ~5 % of a step's CPU), and nearly all find them unchanged.
        Identical arrays are unchanged for any tolerance; anything else goes to ASE's comparison."""
        old = self.atoms
        if old is not None and _same_atoms(old, atoms):
            return []
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = AseAtomsAdaptor.get_structure(atoms)
        # A cell that runs away (collapsing, or blowing up around a molecule) makes the neighbour
        # graph, and its memory, grow without bound: stopped before the model sees it.
        check_relaxation_volume(self.start_volume_per_atom, volume_per_atom(structure))
        if self.on_step is not None:
            self.on_step()
        prediction = self.batcher.evaluate(structure)
        extensive = len(structure) if self.batcher.model.is_intensive else 1
        self.results = {
            "energy": float(prediction["e"]) * extensive,
            "free_energy": float(prediction["e"]) * extensive,
            "forces": np.asarray(prediction["f"]),
            "stress": np.asarray(prediction["s"]) * self.stress_weight,
            "magmoms": np.asarray(prediction["m"]),
        }


def _same_atoms(a, b) -> bool:
    """Cell, periodicity and every per-atom array exactly equal (NaN never equals: ASE decides)."""
    if a.arrays.keys() != b.arrays.keys():
        return False
    if not (np.array_equal(a.cell.array, b.cell.array) and np.array_equal(a.pbc, b.pbc)):
        return False
    return all(np.array_equal(value, b.arrays[key]) for key, value in a.arrays.items())


def relax_batched(
    potential,
    structures: Sequence[Structure],
    *,
    fmax: float = 0.05,
    steps: int = 500,
    relax_cell: bool = True,
    concurrency: int = 8,
    on_step=None,
) -> Iterator[tuple[int, object]]:
    """Yield (position, RelaxResult or exception) as each structure finishes; on_step(position) is
    called at each evaluation of a structure's energy and forces."""
    from ase.optimize import FIRE
    from chgnet.model.dynamics import TrajectoryObserver

    todo: queue.Queue = queue.Queue()
    for position in range(len(structures)):
        todo.put(position)
    done: queue.Queue = queue.Queue()
    n_threads = max(1, min(concurrency, len(structures)))
    batcher = _Batcher(potential.model, n_threads)
    stress_weight = potential.optimizer.calculator.stress_weight

    def relax_one(position: int) -> RelaxResult:
        structure = structures[position]
        atoms = AseAtomsAdaptor.get_atoms(structure)
        step = (lambda: on_step(position)) if on_step is not None else None
        atoms.calc = _BatchedCalculator(batcher, stress_weight, volume_per_atom(structure), step)
        observer = TrajectoryObserver(atoms)
        optimizer = FIRE(frechet_cell_filter(atoms) if relax_cell else atoms, logfile=None)
        optimizer.attach(observer, interval=1)
        optimizer.run(fmax=fmax, steps=steps)
        observer()
        relaxed = AseAtomsAdaptor.get_structure(atoms)
        magmoms = [float(m) for m in atoms.get_magnetic_moments()]
        relaxed.add_site_property("magmom", magmoms)
        return relax_result(structure, relaxed, observer.energies, steps, magmoms)

    def worker() -> None:
        torch.set_flush_denormal(True)  # a per-thread CPU flag: the model runs in these threads (see cpu_threads)
        try:
            while True:
                try:
                    position = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((position, relax_one(position)))
                except Exception as exc:  # reported for this structure; the others go on
                    done.put((position, exc))
        finally:
            batcher.finished()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for _ in range(len(structures)):
        yield done.get()
    for thread in threads:
        thread.join()
