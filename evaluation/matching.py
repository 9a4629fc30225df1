"""Uniqueness within a set and novelty against a reference set (pymatgen StructureMatcher).

MatterGen's settings: ltol 0.2, stol 0.3, angle_tol 5°. Structures of different reduced formulas
can never match, so everything is pre-grouped by reduced formula and StructureMatcher only runs
inside a group (a few ms per pair instead of all N² pairs). Groups are independent, so they are
spread over processes when `workers > 1`.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


@dataclass(frozen=True)
class MatchSettings:
    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0

    def matcher(self) -> StructureMatcher:
        # attempt_supercell: a generated cell may be a supercell of the reference's cell.
        return StructureMatcher(
            ltol=self.ltol, stol=self.stol, angle_tol=self.angle_tol,
            primitive_cell=True, scale=True, attempt_supercell=True,
        )


def reduced_formula(structure: Structure) -> str:
    return structure.composition.reduced_formula


def group_by_formula(structures: Sequence[Structure]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, structure in enumerate(structures):
        groups[reduced_formula(structure)].append(i)
    return dict(groups)


def _duplicate_of_group(task: tuple[list[dict], MatchSettings]) -> list[int]:
    """Within one formula group: for each member, the position of the first equal member."""
    members, settings = task
    structures = [Structure.from_dict(d) for d in members]
    matcher = settings.matcher()
    representatives: list[int] = []  # positions of the first member of each class
    first_of: list[int] = []
    for position, structure in enumerate(structures):
        match = next((r for r in representatives if matcher.fit(structures[r], structure)), None)
        if match is None:
            representatives.append(position)
            match = position
        first_of.append(match)
    return first_of


def duplicate_of(
    structures: Sequence[Structure], settings: MatchSettings = MatchSettings(), workers: int = 1
) -> list[int]:
    """For every structure the index of the first structure it matches (itself when it is first).

    `unique` is then `duplicate_of[i] == i`, and the uniqueness rate is the number of classes over
    the number of structures (3 copies + 2 distinct → 3/5).
    """
    groups = list(group_by_formula(structures).values())
    tasks = [([structures[i].as_dict() for i in members], settings) for members in groups]
    results = _map(_duplicate_of_group, tasks, workers)
    out = list(range(len(structures)))
    for members, first_of in zip(groups, results):
        for position, first in enumerate(first_of):
            out[members[position]] = members[first]
    return out


def _novel_in_group(task: tuple[list[dict], list[dict], MatchSettings]) -> list[bool]:
    members, references, settings = task
    matcher = settings.matcher()
    reference_structures = [Structure.from_dict(d) for d in references]
    return [
        not any(matcher.fit(Structure.from_dict(m), r) for r in reference_structures) for m in members
    ]


class ReferenceIndex:
    """Reference structures grouped by reduced formula (only the formulas that are asked about)."""

    def __init__(self, structures: Iterable[Structure] = (), keep_formulas: set[str] | None = None):
        self.by_formula: dict[str, list[Structure]] = defaultdict(list)
        self.size = 0
        for structure in structures:
            self.add(structure, keep_formulas)

    def add(self, structure: Structure, keep_formulas: set[str] | None = None) -> None:
        self.size += 1
        formula = reduced_formula(structure)
        if keep_formulas is None or formula in keep_formulas:
            self.by_formula[formula].append(structure)


def novel_flags(
    structures: Sequence[Structure],
    reference: ReferenceIndex,
    settings: MatchSettings = MatchSettings(),
    workers: int = 1,
) -> list[bool]:
    """True where no reference structure of the same reduced formula matches."""
    groups = group_by_formula(structures)
    flags = [True] * len(structures)
    tasks, owners = [], []
    for formula, members in groups.items():
        candidates = reference.by_formula.get(formula, [])
        if not candidates:  # a formula the reference never saw is novel without any matching
            continue
        tasks.append(([structures[i].as_dict() for i in members], [c.as_dict() for c in candidates], settings))
        owners.append(members)
    for members, novel in zip(owners, _map(_novel_in_group, tasks, workers)):
        for i, flag in zip(members, novel):
            flags[i] = flag
    return flags


def _map(function, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) <= 1:
        return [function(t) for t in tasks]
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(function, tasks, chunksize=max(1, len(tasks) // (4 * workers)))
