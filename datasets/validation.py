"""Parse one raw input item, validate it, and return a canonical CrystalRecord or a Rejection.

`parse_and_validate` is a pure function of its arguments; it runs in worker processes and never
raises on bad data: every problem becomes a `Rejection` with a reason code from `REASON_CODES`.

CIF parsing has two paths. The public sets (MP-20, Alex-MP-20, Perov-5, Carbon-24) are CIFs
written by pymatgen in space group P1 with fractional coordinates; `parse_p1_cif` reads that
layout directly, about 10x faster than pymatgen's general `CifParser` (which dominates the cost of
building 600k-structure shard sets otherwise) and without its silent repairs (it merges atoms on
the same position and maps unknown symbols to dummy species, which would hide `atoms_too_close`
and `unknown_element`). Any CIF that is not in that layout (symmetry operations other than the
identity, Cartesian coordinates, multi-line text fields, several data blocks, ...) goes through
pymatgen's `CifParser`, so general CIFs are still read correctly.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from xtalgen.datasets.canonical import canonicalize, derive_id
from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.datasets.properties import PropertyError, convert_properties, derived_properties
from xtalgen.record import CrystalRecord
from xtalgen.schema.data import ReaderConfig, ValidationConfig

REASON_CODES: dict[str, str] = {
    "unparsable": "the input could not be parsed as a crystal structure",
    "empty": "the input is empty (no text, or no atoms)",
    "bad_encoding": "the input is not valid UTF-8 text (or contains NUL bytes)",
    "disordered": "partial occupancy or disorder (occupancies must all be 1)",
    "unknown_element": "an atom's element symbol or number is not a chemical element",
    "z_out_of_range": "an atomic number is above the configured maximum (100)",
    "non_finite": "a lattice parameter or coordinate is NaN or infinite",
    "not_periodic": "the structure is not periodic in all three directions",
    "bad_volume": "cell volume is zero, negative, or below the configured minimum",
    "bad_lattice": "the cell could not be Niggli-reduced (degenerate or extremely skewed)",
    "atoms_too_close": "two atoms (periodic images included) are closer than the minimum distance",
    "too_many_atoms": "more atoms than the configured maximum",
    "duplicate_id": "an earlier accepted record has the same id",
    "unreadable_file": "a whole input file could not be read",
    "bad_property": "a mapped property value could not be converted to its type",
}

OCCUPANCY_TOLERANCE = 1e-3


class Reject(Exception):
    """Raised inside parsing/validation; becomes a Rejection with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASON_CODES, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _NotP1Layout(Exception):
    """The CIF is valid-looking but not in the simple P1 layout: use pymatgen's CifParser."""


@dataclass
class ParsedStructure:
    lattice: np.ndarray  # (3, 3) rows are lattice vectors, Å
    frac_coords: np.ndarray  # (N, 3)
    atomic_numbers: np.ndarray  # (N,)
    extra_properties: dict  # raw values found inside the payload (extxyz info, ...)
    id: str | None = None  # an id found inside the payload


# --------------------------------------------------------------------------------------------
# Element table
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _symbol_to_z() -> dict[str, int]:
    from pymatgen.core.periodic_table import Element

    return {el.symbol: int(el.Z) for el in Element}


@lru_cache(maxsize=65536)
def _element_z(symbol: str, from_label: bool) -> int:
    """Atomic number of a CIF type symbol ('Fe', 'Fe2+') or, failing that, a label ('Fe1')."""
    table = _symbol_to_z()
    match = re.match(r"[A-Za-z]+", symbol)
    letters = match.group(0) if match else ""
    candidates = [letters[:2], letters[:1]] if from_label else [letters]
    for candidate in candidates:
        z = table.get(candidate[:1].upper() + candidate[1:].lower()) if candidate else None
        if z is not None:
            return z
    raise Reject("unknown_element", f"{symbol!r} is not an element symbol")


# --------------------------------------------------------------------------------------------
# CIF, fast P1 path
# --------------------------------------------------------------------------------------------
# One regex pass over the whole text: comments, quoted strings (a quote closes only before
# whitespace, as in CIF 1.1), bare words.
_TOKEN = re.compile(r"#[^\n]*|'.*?'(?=\s|$)|\".*?\"(?=\s|$)|\S+", re.MULTILINE)
_UNCERTAINTY = re.compile(r"\(\d+\)$")
_SYMOP_TAGS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz", "_space_group_symop.operation_xyz")
_CELL_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c", "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")


def _unquote(token: str) -> str:
    return token[1:-1] if len(token) >= 2 and token[0] in "'\"" and token[-1] == token[0] else token


def _tokenize_cif(text: str) -> tuple[dict[str, str], list[dict[str, list[str]]]]:
    """Scalar tags and loops of a one-block CIF. Raises _NotP1Layout for features not handled.

    Works on the positions of the keywords (tags, loop_, data_) only; the values between them are
    taken as list slices, so the Python-level work grows with the number of tags, not of values.
    """
    if text.startswith(";") or "\n;" in text:
        raise _NotP1Layout("multi-line text field")
    tokens = [t for t in _TOKEN.findall(text) if t[0] != "#"]
    # Quoted tokens start with a quote, so they are never keywords.
    keywords = [k for k, t in enumerate(tokens) if t[0] == "_" or t[:5].lower() in ("loop_", "data_")]
    keywords.append(len(tokens))
    scalars: dict[str, str] = {}
    loops: list[dict[str, list[str]]] = []
    blocks = 0
    if keywords[0] != 0 and tokens:
        raise Reject("unparsable", f"unexpected token {tokens[0][:40]!r}")
    q = 0
    while q < len(keywords) - 1:
        k, following = keywords[q], keywords[q + 1]
        word = tokens[k].lower()
        if word.startswith("data_"):
            blocks += 1
            if blocks > 1:
                raise _NotP1Layout("several data blocks")
            if following != k + 1:
                raise Reject("unparsable", f"unexpected token {tokens[k + 1][:40]!r}")
            q += 1
        elif word == "loop_":
            first_tag = q + 1  # tags are consecutive keywords right after loop_
            last = first_tag
            while last < len(keywords) - 1 and keywords[last] == keywords[first_tag] + (last - first_tag) \
                    and tokens[keywords[last]][0] == "_":
                last += 1
            tags = [tokens[keywords[j]].lower() for j in range(first_tag, last)]
            start, end = keywords[first_tag] + len(tags) if tags else k + 1, keywords[last]
            values = [_unquote(t) for t in tokens[start:end]]
            if not tags or len(values) % len(tags):
                raise Reject("unparsable", f"loop with {len(tags)} tags has {len(values)} values")
            loops.append({tag: values[j :: len(tags)] for j, tag in enumerate(tags)})
            q = last
        else:
            if following - k != 2:
                raise Reject("unparsable", f"tag {tokens[k]} has {following - k - 1} values")
            scalars[word] = _unquote(tokens[k + 1])
            q += 1
    if blocks == 0:
        raise Reject("unparsable", "no data_ block")
    return scalars, loops


def _cif_float(value: str, what: str) -> float:
    value = _UNCERTAINTY.sub("", value)
    if value in ("?", "."):
        raise _NotP1Layout(f"{what} is unknown ({value!r})")
    try:
        return float(value)
    except ValueError:
        raise Reject("unparsable", f"{what} {value!r} is not a number") from None


def _is_p1(scalars: dict[str, str], loops: list[dict[str, list[str]]]) -> bool:
    for loop in loops:
        for tag in _SYMOP_TAGS:
            if tag in loop:
                ops = {re.sub(r"\s+", "", op).lower() for op in loop[tag]}
                return ops == {"x,y,z"}
    for tag in _SYMOP_TAGS:
        if tag in scalars:
            return re.sub(r"\s+", "", scalars[tag]).lower() == "x,y,z"
    name = scalars.get("_symmetry_space_group_name_h-m") or scalars.get("_space_group_name_h-m_alt")
    number = scalars.get("_symmetry_int_tables_number") or scalars.get("_space_group_it_number")
    return (name is not None and name.replace(" ", "") == "P1") or number == "1"


def parse_p1_cif(text: str) -> tuple[tuple[float, ...], np.ndarray, np.ndarray]:
    """Cell parameters (a, b, c, alpha, beta, gamma), frac coords (N, 3), atomic numbers (N,).

    Raises Reject for bad content and _NotP1Layout for layouts this fast path does not handle.
    """
    scalars, loops = _tokenize_cif(text)
    if not _is_p1(scalars, loops):
        raise _NotP1Layout("symmetry operations other than the identity")
    missing = [t for t in _CELL_TAGS if t not in scalars]
    if missing:
        raise Reject("unparsable", f"missing cell parameters {missing}")
    cell = tuple(_cif_float(scalars[t], t) for t in _CELL_TAGS)
    sites = next((loop for loop in loops if "_atom_site_fract_x" in loop), None)
    if sites is None:
        if any("_atom_site_cartn_x" in loop for loop in loops):
            raise _NotP1Layout("Cartesian coordinates")
        raise Reject("empty", "no atom sites")
    if "_atom_site_fract_y" not in sites or "_atom_site_fract_z" not in sites:
        raise Reject("unparsable", "atom sites lack fract_y or fract_z")
    from_label = "_atom_site_type_symbol" not in sites
    symbols = sites.get("_atom_site_type_symbol") or sites.get("_atom_site_label")
    if symbols is None:  # species given in another loop: an uncommon layout, leave it to pymatgen
        raise _NotP1Layout("atom sites have neither type_symbol nor label")
    occupancies = sites.get("_atom_site_occupancy")
    if occupancies is not None:
        try:
            occ_values = np.array(occupancies, dtype=np.float64)  # (N,)
        except ValueError:
            occ_values = np.array([1.0 if o in ("?", ".") else _cif_float(o, "occupancy") for o in occupancies])
        partial = np.flatnonzero(~(np.abs(occ_values - 1.0) <= OCCUPANCY_TOLERANCE))
        if len(partial):
            k = int(partial[0])
            raise Reject("disordered", f"site {k} ({symbols[k]}) has occupancy {occupancies[k]}")
    columns = [sites[f"_atom_site_fract_{ax}"] for ax in "xyz"]
    try:  # numpy converts the strings in C; values with uncertainties "0.25(1)" take the slow path
        frac = np.array(columns, dtype=np.float64).T  # (N, 3)
    except ValueError:
        frac = np.array([[_cif_float(v, "fractional coordinate") for v in col] for col in columns]).T
    frac = np.ascontiguousarray(frac.reshape(-1, 3))
    numbers = np.array([_element_z(s, from_label) for s in symbols], dtype=np.int64)
    return cell, frac, numbers


def _lattice_from_parameters(cell: tuple[float, ...]) -> np.ndarray:
    """Lattice rows (3, 3) from (a, b, c, alpha, beta, gamma): the Cholesky factor of the metric.

    Any orientation will do here (the canonical form re-orients after the Niggli reduction); the
    Cholesky factor is cheaper than pymatgen's `Lattice.from_parameters` and fails cleanly, as
    LinAlgError, when the angles do not form a cell.
    """
    if not all(math.isfinite(x) for x in cell):
        raise Reject("non_finite", f"cell parameters {cell}")
    a, b, c, alpha, beta, gamma = cell
    if min(a, b, c) <= 0:
        raise Reject("bad_volume", f"cell lengths {a}, {b}, {c} must be positive")
    cos_alpha, cos_beta, cos_gamma = np.cos(np.radians([alpha, beta, gamma]))
    metric = np.array([
        [a * a, a * b * cos_gamma, a * c * cos_beta],
        [a * b * cos_gamma, b * b, b * c * cos_alpha],
        [a * c * cos_beta, b * c * cos_alpha, c * c],
    ])
    try:
        return np.linalg.cholesky(metric)
    except np.linalg.LinAlgError:
        raise Reject("bad_volume", f"cell angles {alpha}, {beta}, {gamma} do not form a cell") from None


def _parse_cif_with_pymatgen(text: str) -> ParsedStructure:
    from pymatgen.core.periodic_table import Element
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            structures = CifParser.from_str(text).parse_structures(primitive=False, on_error="raise")
        except Exception as exc:
            raise Reject("unparsable", f"{type(exc).__name__}: {_first_line(exc)}") from None
    if len(structures) != 1:
        raise Reject("unparsable", f"CIF holds {len(structures)} structures; one per CIF is expected")
    structure = structures[0]
    if not structure.is_ordered:
        raise Reject("disordered", f"partial occupancy: {structure.composition.formula}")
    for site in structure:
        if not isinstance(site.specie, Element):
            raise Reject("unknown_element", f"{site.specie} is not an element")
    return ParsedStructure(
        lattice=structure.lattice.matrix.copy(),
        frac_coords=structure.frac_coords.copy(),
        atomic_numbers=np.array([site.specie.Z for site in structure], dtype=np.int64),
        extra_properties={},
    )


def parse_cif(text: str) -> ParsedStructure:
    if "\x00" in text:
        raise Reject("bad_encoding", "text contains NUL bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # surrogates: bytes that were not UTF-8 in the input
        raise Reject("bad_encoding", f"invalid UTF-8 near character {exc.start}") from None
    if not text.strip():
        raise Reject("empty", "empty CIF text")
    try:
        cell, frac, numbers = parse_p1_cif(text)
    except _NotP1Layout:
        return _parse_cif_with_pymatgen(text)
    if len(numbers) == 0:
        raise Reject("empty", "no atoms")
    if not np.isfinite(frac).all():
        raise Reject("non_finite", "fractional coordinates contain NaN or inf")
    return ParsedStructure(_lattice_from_parameters(cell), frac, numbers, {})


# --------------------------------------------------------------------------------------------
# Atoms-like payloads (ASE database rows, extxyz frames, pymatgen structures)
# --------------------------------------------------------------------------------------------
def parse_atoms_dict(payload: dict) -> ParsedStructure:
    """A plain dict: cell (3, 3), numbers or symbols (N,), frac_coords or positions (N, 3), pbc."""
    pbc = payload.get("pbc", (True, True, True))
    if not all(bool(p) for p in np.asarray(pbc).reshape(-1)):
        raise Reject("not_periodic", f"pbc = {list(np.asarray(pbc).reshape(-1))}")
    occupancies = payload.get("occupancies")
    if occupancies is not None and np.any(np.abs(np.asarray(occupancies, dtype=float) - 1.0) > OCCUPANCY_TOLERANCE):
        raise Reject("disordered", "occupancies other than 1")
    lattice = np.asarray(payload["cell"], dtype=np.float64).reshape(3, 3)
    if "numbers" in payload:
        numbers = np.asarray(payload["numbers"], dtype=np.int64).reshape(-1)
        bad = numbers[numbers < 1]
        if len(bad):
            raise Reject("unknown_element", f"atomic number {int(bad[0])}")
    else:
        numbers = np.array([_element_z(str(s), from_label=False) for s in payload["symbols"]], dtype=np.int64)
    if len(numbers) == 0:
        raise Reject("empty", "no atoms")
    if not np.isfinite(lattice).all():
        raise Reject("non_finite", "cell contains NaN or inf")
    if "frac_coords" in payload:
        frac = np.asarray(payload["frac_coords"], dtype=np.float64).reshape(-1, 3)
    else:
        cart = np.asarray(payload["positions"], dtype=np.float64).reshape(-1, 3)
        if not np.isfinite(cart).all():
            raise Reject("non_finite", "positions contain NaN or inf")
        if abs(np.linalg.det(lattice)) < 1e-12:
            raise Reject("bad_volume", "cell volume is zero")
        frac = np.linalg.solve(lattice.T, cart.T).T  # (N, 3)
    if not np.isfinite(frac).all():
        raise Reject("non_finite", "coordinates contain NaN or inf")
    if len(frac) != len(numbers):
        raise Reject("unparsable", f"{len(frac)} positions for {len(numbers)} atoms")
    return ParsedStructure(lattice, frac, numbers, {})


def parse_extxyz_frame(text: str, id_column: str) -> ParsedStructure:
    """One extended-XYZ frame (count line, comment line, atom lines) read with ASE."""
    from ase.io import read

    if "\x00" in text:
        raise Reject("bad_encoding", "text contains NUL bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("bad_encoding", "invalid UTF-8") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = read(io.StringIO(text), format="extxyz", index=0)
    except Exception as exc:
        raise Reject("unparsable", f"{type(exc).__name__}: {_first_line(exc)}") from None
    parsed = parse_atoms_dict(
        {"cell": atoms.cell.array, "numbers": atoms.numbers, "positions": atoms.positions, "pbc": atoms.pbc}
    )
    info = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, np.number))}
    parsed.extra_properties = {k: (v.item() if isinstance(v, np.number) else v) for k, v in info.items()}
    if id_column in info:
        parsed.id = str(info[id_column])
    return parsed


def parse_payload(item: RawItem, reader: ReaderConfig) -> ParsedStructure:
    if item.kind == "cif":
        if isinstance(item.payload, (bytes, bytearray)):
            try:
                text = bytes(item.payload).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject("bad_encoding", f"invalid UTF-8 at byte {exc.start}") from None
        else:
            text = "" if item.payload is None else str(item.payload)
        return parse_cif(text)
    if item.kind == "atoms_dict":
        return parse_atoms_dict(item.payload)
    if item.kind == "extxyz":
        return parse_extxyz_frame(str(item.payload), reader.id_column)
    raise Reject("unparsable", f"unknown input kind {item.kind!r}")


# --------------------------------------------------------------------------------------------
# Validation of the parsed structure
# --------------------------------------------------------------------------------------------
def check_atoms(numbers: np.ndarray, validation: ValidationConfig) -> None:
    if len(numbers) == 0:
        raise Reject("empty", "no atoms")
    if len(numbers) > validation.max_atoms:
        raise Reject("too_many_atoms", f"{len(numbers)} atoms > max_atoms={validation.max_atoms}")
    too_heavy = numbers[numbers > validation.max_atomic_number]
    if len(too_heavy):
        raise Reject("z_out_of_range", f"Z={int(too_heavy[0])} > {validation.max_atomic_number}")


def check_volume(lattice: np.ndarray, validation: ValidationConfig) -> None:
    volume = float(np.linalg.det(lattice))
    if volume < 0:
        raise Reject("bad_volume", f"negative volume {volume:.6g} Å³ (left-handed cell)")
    if volume <= 0 or volume < validation.min_volume:
        raise Reject("bad_volume", f"volume {volume:.6g} Å³ < min_volume={validation.min_volume}")


def closest_pair(lattice: np.ndarray, frac_coords: np.ndarray, cutoff: float) -> tuple[float, int, int] | None:
    """The closest pair of atoms (periodic images included) if any is closer than `cutoff`.

    Uses pymatgen's compiled cell-list search, exact for any cell shape.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    cart = np.ascontiguousarray(frac_coords @ lattice)  # (N, 3)
    i, j, offsets, distances = find_points_in_spheres(
        cart, cart, r=float(cutoff), pbc=np.ones(3, dtype=np.int64),
        lattice=np.ascontiguousarray(lattice), tol=1e-8,
    )
    is_self = (i == j) & np.all(offsets == 0, axis=1)
    keep = ~is_self & (distances < cutoff)
    if not keep.any():
        return None
    k = int(np.argmin(np.where(keep, distances, np.inf)))
    return float(distances[k]), int(i[k]), int(j[k])


def check_distances(lattice: np.ndarray, frac_coords: np.ndarray, validation: ValidationConfig) -> None:
    if validation.min_distance <= 0:
        return
    pair = closest_pair(lattice, frac_coords, validation.min_distance)
    if pair is not None:
        distance, i, j = pair
        raise Reject(
            "atoms_too_close",
            f"atoms {i} and {j} are {distance:.4f} Å apart < min_distance={validation.min_distance}",
        )


def parse_and_validate(
    item: RawItem | Rejection, reader: ReaderConfig, validation: ValidationConfig
) -> CrystalRecord | Rejection:
    """Turn one raw item into a canonical record, or say precisely why not. Never raises."""
    if isinstance(item, Rejection):  # rejected while reading (unreadable file): pass through
        return item
    record_id = item.id or derive_id(item.source)
    try:
        parsed = parse_payload(item, reader)
        record_id = item.id or parsed.id or record_id
        check_atoms(parsed.atomic_numbers, validation)
        check_volume(parsed.lattice, validation)
        try:
            lattice, frac, numbers = canonicalize(parsed.lattice, parsed.frac_coords, parsed.atomic_numbers)
        except (ValueError, np.linalg.LinAlgError) as exc:
            raise Reject("bad_lattice", f"{type(exc).__name__}: {_first_line(exc)}") from None
        check_distances(lattice, frac, validation)
        try:
            properties = convert_properties({**parsed.extra_properties, **item.properties}, reader)
        except PropertyError as exc:
            raise Reject("bad_property", str(exc)) from None
        derived = derived_properties(numbers, reader, lattice, frac)
        if "space_group" in properties:  # a space-group column wins over the computed one
            derived.pop("space_group", None)
        properties.update(derived)
        check_text(record_id, properties)
        return CrystalRecord(id=record_id, lattice=lattice, frac_coords=frac, atomic_numbers=numbers,
                             properties=properties)
    except Reject as rej:
        return _rejection(record_id, item.source, rej.reason, rej.detail)
    except Exception as exc:  # a bug or an input we did not foresee must not stop 600k others
        return _rejection(record_id, item.source, "unparsable", f"{type(exc).__name__}: {_first_line(exc)}")


def check_text(record_id: str, properties: dict) -> None:
    """Ids and string properties must be valid UTF-8 (bytes that were not arrive as surrogates)."""
    for what, text in [("id", record_id)] + [(f"property {k!r}", v) for k, v in properties.items() if isinstance(v, str)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Reject("bad_encoding", f"{what} is not valid UTF-8") from None


def printable(text: str) -> str:
    """`text` with undecodable input bytes written as backslash escapes (b"\\xff" -> "\\xff")."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from input bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _rejection(record_id: str, source: str, reason: str, detail: str) -> Rejection:
    return Rejection(id=printable(record_id), source=printable(source), reason=reason, detail=printable(detail))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
