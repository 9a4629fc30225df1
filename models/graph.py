"""Periodic radius graph and the message-passing hot path.

Both are the score network's hot path, kept behind two small functions so that fused GPU
implementations can replace the pure-PyTorch reference without touching the model:

* `radius_graph_pbc` finds, for every atom, its neighbours within a cutoff over all periodic
  images (MatterGen: 7 Å, at most the 50 nearest). It is rebuilt from the noisy structure on every
  forward pass. Selection runs without gradients in float64 (so float32 and float64 models see the
  same graph); the returned edge vectors are recomputed differentiably in the input dtype. For
  each atom pair only the lattice translations inside the cutoff sphere are visited (a batched
  Fincke-Pohst enumeration in a reduced basis), not the whole box of images around the cell.
  `algorithm="cell_list"` (`radius_graph_pbc_cell_list`) finds the same candidates by binning the
  atoms' images into cubes of side ~ the cutoff instead, the usual choice on a GPU; the ordering and
  the neighbour cap are shared, so both give identical edges in the same order.
* `message_passing` gathers source-node features along edges, multiplies them by an edge filter and
  scatter-adds the products onto the target nodes. Backends live in a registry: "torch" (the
  reference and the CPU path) now; a fused kernel registered with `torch.library` plugs in by name.

Hand-written rather than taken from a library: torch_cluster / PyG's radius graph has no wheels for
this torch version and knows no periodic images; ase / matscipy / pymatgen neighbour lists run on the
CPU in numpy, one structure at a time. The score network also needs exact control of image
enumeration and of tie-breaking at the neighbour cap. pymatgen is the reference in the tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

# Pairs enumerated at once (all atom pairs x periodic images of a group of structures). Bounds the
# temporary memory of graph construction (~100 bytes per pair) independently of the batch size.
DEFAULT_MAX_PAIRS_PER_CHUNK = 1 << 21
# Images per lattice direction are capped so a degenerate noisy cell (near-zero volume) cannot ask
# for millions of images; neighbours beyond the cap are then missed, which only happens for cells
# thinner than cutoff / MAX_IMAGES_PER_DIM Å.
DEFAULT_MAX_IMAGES_PER_DIM = 12
# A dense cell is first searched within this multiple of the radius of a sphere that holds
# `max_neighbors` atoms at its density (see `_select_edges`).
DENSE_RADIUS_FACTOR = 1.5
# Neighbour ranking resolves distances to 1e-8 Å (see `_canonical_order`).
DISTANCE_RESOLUTION_INV = 1e8
# Packed sort keys of `_canonical_order`: a distance on that grid takes 40 bits (cutoffs < 10^4 Å),
# leaving 23 for the atom index of the target; an image component takes 10 bits (|shift| < 512, far
# beyond the cap of images per direction plus the wrap-around), leaving 33 for the source.
DISTANCE_KEY_BITS = 40
IMAGE_KEY_BITS = 10
IMAGE_KEY_OFFSET = 1 << (IMAGE_KEY_BITS - 1)


class PeriodicGraph(NamedTuple):
    edge_index: Tensor  # (2, E) long, rows [source, target]; sorted by target, then distance
    edge_vec: Tensor  # (E, 3) x_src + cell_offsets @ L - x_tgt, Å, differentiable
    cell_offsets: Tensor  # (E, 3) long, lattice translation applied to the source atom


def radius_graph_pbc(
    cart_coords: Tensor,
    lattice: Tensor,
    batch_index: Tensor,
    num_atoms: Tensor,
    cutoff: float = 7.0,
    max_neighbors: int | None = 50,
    *,
    max_images_per_dim: int = DEFAULT_MAX_IMAGES_PER_DIM,
    max_pairs_per_chunk: int = DEFAULT_MAX_PAIRS_PER_CHUNK,
    algorithm: str = "sphere",
) -> PeriodicGraph:
    """All (source image, target) pairs closer than `cutoff`, at most `max_neighbors` per target.

    cart_coords (N, 3) Å; lattice (B, 3, 3) rows are lattice vectors; batch_index (N,) and
    num_atoms (B,) describe a flat batch whose atoms are grouped by structure in order (what
    `xtalgen.batch.collate` produces). Atoms need not lie inside the cell. An atom is its own
    neighbour through non-zero lattice translations (small cells), never at zero shift.
    The `max_neighbors` nearest are kept; equal distances are broken by source index and then
    image, deterministically. Structures are processed in groups of at most
    `max_pairs_per_chunk` candidate pairs, so memory does not grow with the square of the batch.
    `algorithm` picks how candidate images are found (see `GRAPH_ALGORITHMS`): "sphere" (per-pair
    Fincke-Pohst enumeration, the default) or "cell_list" (binned images, the usual GPU choice);
    both give identical edges, in the same order.
    """
    if algorithm not in GRAPH_ALGORITHMS:
        raise ValueError(f"unknown radius-graph algorithm {algorithm!r}; available: {sorted(GRAPH_ALGORITHMS)}")
    if cart_coords.ndim != 2 or cart_coords.shape[1] != 3:
        raise ValueError(f"cart_coords must be (N, 3), got {tuple(cart_coords.shape)}")
    if lattice.ndim != 3 or lattice.shape[1:] != (3, 3):
        raise ValueError(f"lattice must be (B, 3, 3), got {tuple(lattice.shape)}")
    with torch.no_grad():
        source, target, offsets = _select_edges(
            cart_coords.detach().double(),
            lattice.detach().double(),
            batch_index,
            num_atoms,
            cutoff,
            max_neighbors,
            max_images_per_dim,
            max_pairs_per_chunk,
            GRAPH_ALGORITHMS[algorithm],
        )
    shift = torch.einsum("ei,eij->ej", offsets.to(lattice.dtype), lattice[batch_index[target]])  # (E, 3)
    edge_vec = cart_coords[source] + shift - cart_coords[target]
    return PeriodicGraph(torch.stack([source, target]), edge_vec, offsets)


# The same edges, in the same order, found by the cell list (see `radius_graph_pbc`).
radius_graph_pbc_cell_list = functools.partial(radius_graph_pbc, algorithm="cell_list")


def _select_edges(cart, lattice, batch_index, num_atoms, cutoff, max_neighbors, max_images, max_pairs, search):
    inv_lattice, singular = torch.linalg.inv_ex(lattice)  # (B, 3, 3); column k: reciprocal vector k (no 2π)
    bad = (singular != 0) | ~torch.isfinite(inv_lattice).flatten(1).all(dim=1)  # (B,)
    if bad.any():
        raise ValueError(f"singular or non-finite lattice in structures {bad.nonzero().flatten().tolist()}")
    frac = torch.einsum("ni,nij->nj", cart, inv_lattice[batch_index])  # (N, 3)
    if not torch.isfinite(frac).all():
        bad = batch_index[~torch.isfinite(frac).all(dim=1)].unique().tolist()
        raise ValueError(f"non-finite coordinates in structures {bad}")
    cell_of_atom = torch.floor(frac)  # (N, 3) which cell copy each input position sits in

    # Images are enumerated in a reduced basis of the same lattice (L_red = U L, U unimodular): a
    # skewed cell, common among noisy lattices, needs up to 25^3 images in its own basis and a few
    # dozen in a reduced one. The edges found are the same; their order and the neighbour cap are
    # then decided in the given basis (see `_canonical_order`), so the graph does not depend on U.
    reduced, unimodular = _reduce_basis(lattice)  # (B, 3, 3) each
    inv_reduced = torch.linalg.inv(reduced)
    frac_reduced = torch.einsum("ni,nij->nj", cart, inv_reduced[batch_index])  # (N, 3)
    cell_reduced = torch.floor(frac_reduced)
    wrapped = frac_reduced - cell_reduced  # (N, 3) fractional in the reduced basis, in [0, 1]

    # A dense (collapsed) noisy cell holds thousands of images within the cutoff, of which only the
    # `max_neighbors` nearest are kept. Such structures are first searched within the radius that
    # should hold that many neighbours; wherever some atom then has fewer, the structure is searched
    # again within the full cutoff. Either way the kept edges are exactly those of a full search.
    radius = torch.full_like(lattice[:, 0, 0], cutoff)  # (B,)
    if max_neighbors is not None and max_neighbors > 0:
        volume_per_atom = torch.linalg.det(lattice).abs() / num_atoms.to(lattice.dtype)
        guess = DENSE_RADIUS_FACTOR * (max_neighbors * volume_per_atom * 3 / (4 * torch.pi)) ** (1 / 3)
        radius = torch.minimum(radius, guess)
    geometry = (wrapped, reduced, inv_reduced, num_atoms, max_images, max_pairs, search)
    source, target, shift_reduced, dist = _candidates(geometry, radius, torch.ones_like(num_atoms, dtype=torch.bool))
    shrunk = radius < cutoff
    if shrunk.any():
        # enough neighbours strictly inside the radius (minus the ranking grid) for every atom?
        inside = torch.zeros_like(batch_index).index_add_(
            0, target, (dist < radius[batch_index[target]] - 2 / DISTANCE_RESOLUTION_INV).long())
        short = torch.zeros_like(shrunk)
        short[batch_index[inside < max_neighbors]] = True
        redo = shrunk & short
        if redo.any():
            keep = ~redo[batch_index[target]]
            again = _candidates(geometry, torch.full_like(radius, cutoff), redo)
            source, target, shift_reduced, dist = (
                torch.cat([old[keep], new]) for old, new in zip((source, target, shift_reduced, dist), again)
            )
    # Lattice translations as given: from the reduced basis (n_red L_red = n_red U L), re-expressed
    # for the positions as given, then as the shift between the atoms wrapped in the given basis.
    offsets_reduced = shift_reduced - cell_reduced[source].long() + cell_reduced[target].long()
    offsets = torch.einsum("ei,eij->ej", offsets_reduced, unimodular[batch_index[target]])  # (E, 3)
    image_shift = offsets + cell_of_atom[source].long() - cell_of_atom[target].long()
    order = _canonical_order(target, dist, source, image_shift)
    source, target, offsets = source[order], target[order], offsets[order]
    if max_neighbors is not None and max_neighbors > 0 and target.numel():
        keep = _rank_within_group(target) < max_neighbors
        source, target, offsets = source[keep], target[keep], offsets[keep]
    return source, target, offsets


def _candidates(geometry, radius: Tensor, structures: Tensor):
    """Pairs within `radius` (B,) of the chosen `structures` (B,) bool: source, target, image, dist."""
    wrapped, reduced, inv_reduced, num_atoms, max_images, max_pairs, search = geometry
    # Wrapped fractional differences lie in [-1, 1], so a neighbour within the radius needs
    # |n_k| <= radius * |b_k| + 1 along reciprocal direction b_k. This box bounds the memory of a
    # chunk; the search itself visits only the lattice points of each pair's sphere.
    recip_norm = inv_reduced.norm(dim=1)  # (B, 3)
    images = (torch.floor(radius[:, None] * recip_norm) + 1).clamp(max=max_images).long()  # (B, 3)
    images_count = (2 * images + 1).prod(dim=1)  # (B,)
    pairs = num_atoms * num_atoms * images_count * structures  # (B,), 0 for structures left out
    atom_start = torch.cumsum(num_atoms, 0) - num_atoms  # (B,)
    triangular = _upper_triangular_factor(reduced)  # (B, 3, 3)
    parts = [
        search(lo, hi, wrapped, reduced, triangular, num_atoms * structures, atom_start, images, radius)
        for lo, hi in _chunks(pairs.tolist(), max_pairs)
    ]
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=wrapped.device)
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=wrapped.device), wrapped.new_zeros(0)
    return tuple(torch.cat(x) for x in zip(*parts))


def _upper_triangular_factor(lattice: Tensor) -> Tensor:
    """R (B, 3, 3) upper triangular with positive diagonal and |f @ L| = |R f| for every f (QR of L^T).

    Row k of R f involves only f_k..f_2, which is what lets `_sphere_points` bound one fractional
    coordinate at a time.
    """
    _, upper = torch.linalg.qr(lattice.transpose(1, 2))
    sign = torch.sign(torch.diagonal(upper, dim1=1, dim2=2))  # (B, 3)
    return upper * torch.where(sign == 0, torch.ones_like(sign), sign)[:, :, None]


# Relative and absolute slack of the sphere search's bounds: every bound is widened by far more
# than its float64 rounding, so no lattice point within the radius is missed; the candidates are
# then tested against the radius exactly as a brute-force search tests them.
SPHERE_SEARCH_SLACK = 1e-9


def _edges_of_structures(lo, hi, wrapped, lattice, triangular, num_atoms, atom_start, images, radius):
    """Every (source, target, image) triple of structures lo..hi-1 closer than the structure's radius.

    num_atoms (B,) is 0 for structures left out. Returns source, target (N-indices), the integer
    image shift between the wrapped positions (E, 3) and the distance (E,), unordered. The distance
    is computed as a brute force over the image box computes it, so the edges are the same.
    """
    device = wrapped.device
    atom_pairs = num_atoms[lo:hi] * num_atoms[lo:hi]  # (b,)
    struct = torch.repeat_interleave(torch.arange(lo, hi, device=device), atom_pairs)  # (P,)
    local = torch.arange(struct.numel(), device=device) - (torch.cumsum(atom_pairs, 0) - atom_pairs)[struct - lo]
    n = num_atoms[struct]
    source, target = atom_start[struct] + local // n, atom_start[struct] + local % n
    diff = wrapped[source] - wrapped[target]  # (P, 3) fractional, in [-1, 1]
    pair, shift = _sphere_points(diff, triangular[struct], radius[struct], images[struct])
    source, target, struct = source[pair], target[pair], struct[pair]
    # Differences are taken in fractional space: an atom's images at +n and -n then have exactly
    # equal distances, so their tie is broken by image order and never by rounding noise.
    return _within_radius(source, target, struct, diff[pair], shift, lattice, radius)


def _within_radius(source, target, struct, diff, shift, lattice, radius):
    """The candidates (E,) closer than their structure's radius, but an atom itself at zero shift.

    diff (E, 3) wrapped fractional difference source - target, shift (E, 3) long image. Shared by
    both searches, so that the same triple gets the same float64 distance whichever found it.
    """
    frac_vec = diff + shift.double()  # (E, 3)
    vec = torch.einsum("pi,pij->pj", frac_vec, lattice[struct])
    dist = vec.norm(dim=1)  # (E,)
    keep = (dist < radius[struct]) & ~((source == target) & (shift == 0).all(dim=1))
    return source[keep], target[keep], shift[keep], dist[keep]


def _sphere_points(diff: Tensor, triangular: Tensor, radius: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
    """Integer shifts n with |R (diff + n)| < radius (up to the slack), |n_k| <= images_k, per pair.

    diff (P, 3), triangular R (P, 3, 3) upper, radius (P,), images (P, 3). Fincke-Pohst enumeration,
    batched: fix n_2 within |R_22 f_2| <= r, then n_1 within the chord that remains, then n_0, so only
    the points of each pair's sphere are visited instead of its whole image box (a 5-atom perovskite
    at 7 Å: about a quarter). Returns the pair index (E,) and the shift (E, 3) long of each point.
    """
    pair = torch.arange(diff.shape[0], device=diff.device)  # (C,) the pair of each partial point
    shift = torch.zeros(diff.shape[0], 3, dtype=torch.long, device=diff.device)  # (C, 3) chosen so far
    bound = radius * (1 + SPHERE_SEARCH_SLACK) + SPHERE_SEARCH_SLACK
    remaining = bound.square()  # (C,) squared radius left for the coordinates not yet fixed
    for k in (2, 1, 0):
        rk = triangular[pair, k]  # (C, 3) row k of R
        fixed = (diff[pair, k + 1:] + shift[:, k + 1:].double()) * rk[:, k + 1:]  # (C, 2 - k)
        offset = fixed.sum(dim=1)  # (C,) contribution of the coordinates already fixed
        half = remaining.clamp_min(0).sqrt() / rk[:, k] * (1 + SPHERE_SEARCH_SLACK) + SPHERE_SEARCH_SLACK
        centre = -offset / rk[:, k] - diff[pair, k]  # (C,) the chord's centre in n_k
        cap = images[pair, k].double()
        low = torch.nan_to_num(torch.ceil(centre - half), nan=-torch.inf).maximum(-cap)  # NaN: the whole box
        high = torch.nan_to_num(torch.floor(centre + half), nan=torch.inf).minimum(cap)
        count = (high - low + 1).clamp_min(0).long()  # (C,)
        parent = torch.repeat_interleave(torch.arange(pair.shape[0], device=diff.device), count)  # (C',)
        step = torch.arange(parent.shape[0], device=diff.device) - (torch.cumsum(count, 0) - count)[parent]
        chosen = low.long()[parent] + step  # (C',) n_k
        pair, shift, offset, remaining = pair[parent], shift[parent], offset[parent], remaining[parent]
        shift[:, k] = chosen
        row = triangular[pair, k, k] * (diff[pair, k] + chosen.double()) + offset
        remaining = remaining - row.square()
    return pair, shift


# Bins of the cell list are this much wider than the radius (relative, then absolute, Å), far more
# than the float64 rounding of the positions, so a pair within the radius is never two bins apart.
CELL_LIST_BIN_SLACK = 1e-6
# The 27 bin offsets of a bin's neighbourhood, itself included.
_STENCIL = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]


def _edges_of_structures_cell_list(lo, hi, wrapped, lattice, triangular, num_atoms, atom_start, images, radius):
    """`_edges_of_structures` by a cell list: the same (source, target, image, distance) set.

    Every atom of structures lo..hi-1 is replicated over the same image box |n_k| <= images_k (in
    the reduced basis) as the sphere search; the points are binned into Cartesian cubes of side just
    above the structure's radius, keyed by (structure, bin) and sorted; each target (an atom at
    n = 0) takes as candidates the points of its 27 neighbouring bins (searchsorted on the sorted
    keys, repeat_interleave over the variable counts), whose distance is then tested exactly as the
    sphere search tests it. Candidates per target are at most the points of its structure, so a
    chunk needs no more memory than the sphere search's bound of num_atoms^2 x images.
    """
    del triangular  # the sphere search's; bins need none
    device = wrapped.device
    n = num_atoms[lo:hi]  # (b,) 0 for structures left out
    widths = 2 * images[lo:hi] + 1  # (b, 3)
    per_atom = widths.prod(dim=1)  # (b,) images per atom
    structs = torch.arange(lo, hi, device=device)

    # Points: (atom, image) for every atom and image of the box, grouped by structure.
    point_count = n * per_atom  # (b,)
    p_struct = torch.repeat_interleave(structs, point_count)  # (P,)
    local = torch.arange(p_struct.numel(), device=device) - (torch.cumsum(point_count, 0) - point_count)[p_struct - lo]
    w = widths[p_struct - lo]  # (P, 3)
    p_atom = atom_start[p_struct] + local // per_atom[p_struct - lo]
    idx = local % per_atom[p_struct - lo]
    p_shift = torch.stack([idx // (w[:, 1] * w[:, 2]), (idx // w[:, 2]) % w[:, 1], idx % w[:, 2]], dim=1)
    p_shift = p_shift - images[p_struct]  # (P, 3) long
    p_cart = torch.einsum("pi,pij->pj", wrapped[p_atom] + p_shift.double(), lattice[p_struct])  # (P, 3)

    # Targets: the atoms themselves (n = 0).
    t_struct = torch.repeat_interleave(structs, n)  # (T,)
    t_atom = atom_start[t_struct] + torch.arange(t_struct.numel(), device=device) - (torch.cumsum(n, 0) - n)[
        t_struct - lo
    ]
    t_cart = torch.einsum("pi,pij->pj", wrapped[t_atom], lattice[t_struct])  # (T, 3)

    # Bins of each structure: side just above its radius, from two bins below its lowest target, so
    # targets fall in bins 1..top and their neighbours in 0..top+1; points outside are never needed.
    side = radius[lo:hi] * (1 + CELL_LIST_BIN_SLACK) + CELL_LIST_BIN_SLACK  # (b,)
    low = torch.full((hi - lo, 3), torch.inf, dtype=wrapped.dtype, device=device)
    low = low.scatter_reduce(0, (t_struct - lo)[:, None].expand(-1, 3), t_cart, "amin", include_self=True)
    origin = low - 2 * side[:, None]
    low = torch.where(torch.isfinite(origin), origin, torch.zeros_like(origin))  # structures with no atoms
    t_bin = torch.floor((t_cart - low[t_struct - lo]) / side[t_struct - lo, None]).long()  # (T, 3)
    top = torch.zeros(hi - lo, 3, dtype=torch.long, device=device)
    top = top.scatter_reduce(0, (t_struct - lo)[:, None].expand(-1, 3), t_bin, "amax", include_self=True)
    dims = top + 2  # (b, 3) bins 0..top+1 per direction
    bins = dims.prod(dim=1)
    key_start = torch.cumsum(bins, 0) - bins  # (b,) first key of each structure

    def key(struct_local: Tensor, b: Tensor) -> Tensor:
        d = dims[struct_local]
        return key_start[struct_local] + (b[:, 0] * d[:, 1] + b[:, 1]) * d[:, 2] + b[:, 2]

    p_bin = torch.floor((p_cart - low[p_struct - lo]) / side[p_struct - lo, None]).long()  # (P, 3)
    inside = ((p_bin >= 0) & (p_bin < dims[p_struct - lo])).all(dim=1)
    p_struct, p_atom, p_shift, p_bin = p_struct[inside], p_atom[inside], p_shift[inside], p_bin[inside]
    p_key, order = torch.sort(key(p_struct - lo, p_bin))
    p_atom, p_shift, p_cart = p_atom[order], p_shift[order], p_cart[inside][order]

    # Candidates: for each target and stencil offset, the run of points with that bin's key.
    starts, counts = [], []
    for offset in _STENCIL:
        k = key(t_struct - lo, t_bin + torch.tensor(offset, device=device))
        first = torch.searchsorted(p_key, k)
        starts.append(first)
        counts.append(torch.searchsorted(p_key, k, right=True) - first)
    starts, counts = torch.stack(starts, dim=1).flatten(), torch.stack(counts, dim=1).flatten()  # (T * 27,)
    run = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)  # (C,)
    point = starts[run] + torch.arange(run.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[run]
    tgt = run // len(_STENCIL)  # (C,) index into the targets
    # Cheap pre-test on the Cartesian positions, looser than the bins' slack (so it drops no pair
    # within the radius), before the exact test gathers the lattices: most of a 27-bin block lies
    # outside the sphere.
    near = (p_cart[point] - t_cart[tgt]).square().sum(dim=1) < side[t_struct[tgt] - lo].square()
    tgt, point = tgt[near], point[near]
    target, struct = t_atom[tgt], t_struct[tgt]
    source, shift = p_atom[point], p_shift[point]
    return _within_radius(source, target, struct, wrapped[source] - wrapped[target], shift, lattice, radius)


# How `radius_graph_pbc` finds the candidate images of each structure group (its `algorithm`).
# Each entry has the signature of `_edges_of_structures` and must return the same set of edges.
GRAPH_ALGORITHMS: dict[str, Callable] = {
    "sphere": _edges_of_structures,
    "cell_list": _edges_of_structures_cell_list,
}


# Rounds of pairwise (Gauss) size reduction; each round makes every lattice vector as short as
# subtracting integer multiples of another one can. A few rounds reach a fixed point in practice.
BASIS_REDUCTION_ROUNDS = 6


def _reduce_basis(lattice: Tensor) -> tuple[Tensor, Tensor]:
    """A shorter basis of each lattice, (B, 3, 3) rows, and the integer U with reduced = U @ lattice.

    Pairwise size reduction b_i <- b_i - round(b_i.b_j / b_j.b_j) b_j over all ordered pairs,
    repeated: not a full Minkowski reduction, but it removes the shear of noisy cells, which is what
    multiplies the images to enumerate. Written here because it must run batched on tensors (spglib
    and pymatgen reduce one structure at a time, in numpy).
    """
    reduced = lattice.clone()
    unimodular = torch.eye(3, dtype=torch.long, device=lattice.device).repeat(lattice.shape[0], 1, 1)
    for _ in range(BASIS_REDUCTION_ROUNDS):
        changed = torch.zeros((), dtype=torch.bool, device=lattice.device)
        for i, j in ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)):
            bi, bj = reduced[:, i], reduced[:, j]
            mu = torch.round((bi * bj).sum(-1) / (bj * bj).sum(-1))  # (B,); 0 leaves b_i as it is
            changed |= (mu != 0).any()
            reduced[:, i] = bi - mu[:, None] * bj
            unimodular[:, i] = unimodular[:, i] - mu.long()[:, None] * unimodular[:, j]
        if not bool(changed):  # one host sync per round, not per pair
            break
    return reduced, unimodular


def _canonical_order(target: Tensor, dist: Tensor, source: Tensor, image_shift: Tensor) -> Tensor:
    """Edge order: by target, then distance, then source, then image (lexicographic in the given basis).

    This is the order of a brute-force enumeration in the given basis (sources, then images), so
    ties at the neighbour cap are broken the same whatever basis the images were found in.
    Distances are compared on a 1e-8 Å grid so that shells which are exactly degenerate (a cubic
    cell's images along a, b and c) stay ties after a rotation of the frame adds rounding noise.
    Two stable sorts of packed int64 keys: (source, image) first, then (target, distance).
    """
    image_key = (image_shift + IMAGE_KEY_OFFSET).clamp(0, 2 * IMAGE_KEY_OFFSET - 1)  # (E, 3) in [0, 2^k)
    bits = IMAGE_KEY_BITS
    minor = (source << (3 * bits)) | (image_key[:, 0] << (2 * bits)) | (image_key[:, 1] << bits) | image_key[:, 2]
    order = torch.sort(minor, stable=True).indices
    grid = torch.round(dist * DISTANCE_RESOLUTION_INV).long()  # < 2^40 for any cutoff below 10^4 Å
    major = (target << DISTANCE_KEY_BITS) | grid
    return order[torch.sort(major[order], stable=True).indices]


def _chunks(pairs: list[int], max_pairs: int):
    """Contiguous structure ranges [lo, hi) holding at most `max_pairs` pairs (or one structure)."""
    lo, total = 0, 0
    for b, p in enumerate(pairs):
        if b > lo and total + p > max_pairs:
            yield lo, b
            lo, total = b, 0
        total += p
    if lo < len(pairs):
        yield lo, len(pairs)


def _rank_within_group(sorted_keys: Tensor) -> Tensor:
    """Position of each element inside its run of equal keys, for a sorted key tensor."""
    index = torch.arange(sorted_keys.numel(), device=sorted_keys.device)
    is_start = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=0).values
    return index - run_start


# ---------------------------------------------------------------------------------------------
# Message passing: out[t] = sum over edges e=(s -> t) of node_feats[s] * edge_filter[e]
#
# Features may carry a middle axis K that broadcasts between nodes and edges: vector features
# (N, 3, H) times a scalar filter (E, 1, H), or scalar features (N, 1, H) times a directional
# filter (E, 3, H). Broadcasting inside the op spares materialising repeated (E, 3, H) tensors.

MessagePassingFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]
_BACKENDS: dict[str, MessagePassingFn] = {}


def register_message_passing_backend(name: str, fn: MessagePassingFn) -> None:
    """Make `fn(node_feats (N, K, C), edge_filter (E, K', C), edge_index (2, E), num_nodes)
    -> (N, max(K, K'), C)` available as `backend=name` (K, K' in {1, K}). It must compute what
    `message_passing_torch` computes; inputs arrive 3-D and contiguous."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def message_passing_torch(node_feats: Tensor, edge_filter: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """Reference: gather along edges, multiply by the filter, scatter-add (index_add_) to targets."""
    source, target = edge_index
    messages = node_feats.index_select(0, source) * edge_filter  # (E, K, C)
    # Sums of ~50 messages lose most of bf16's 8 mantissa bits: accumulate in at least float32.
    acc_dtype = torch.promote_types(messages.dtype, torch.float32)
    out = messages.new_zeros(num_nodes, *messages.shape[1:], dtype=acc_dtype)
    return out.index_add_(0, target, messages.to(acc_dtype)).to(messages.dtype)


register_message_passing_backend("torch", message_passing_torch)


def message_passing_triton(node_feats: Tensor, edge_filter: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """Fused Triton kernels (`xtalgen.models.triton_message_passing`), imported on first use:
    importing Triton takes seconds, and CPU runs never need it. CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1 (the parity tests)."""
    from xtalgen.models.triton_message_passing import message_passing_triton as fused

    return fused(node_feats, edge_filter, edge_index, num_nodes)


register_message_passing_backend("triton", message_passing_triton)


def backend_unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run in this process (None if it can): checked once when a model is built,
    so a CPU run asking for the GPU kernels stops with one clear line instead of a kernel error."""
    if backend != "triton":
        return None
    try:
        from xtalgen.models.triton_message_passing import unavailable_reason
    except ImportError as exc:
        return f"the triton backend needs Triton ({exc}); install xtalgen[gpu] or use model.score_net.backend=torch"
    return unavailable_reason()


def message_passing(
    node_feats: Tensor,
    edge_filter: Tensor,
    edge_index: Tensor,
    num_nodes: int | None = None,
    backend: str = "torch",
) -> Tensor:
    """out[t] = sum_{e: target(e)=t} node_feats[source(e)] * edge_filter[e].

    node_feats (N, C) with edge_filter (E, C) gives (N, C); with a middle axis, node_feats
    (N, K, C) and edge_filter (E, K', C) broadcast over it and give (N, max(K, K'), C).
    edge_index (2, E) holds [source, target].
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown message-passing backend {backend!r}; available: {available_backends()}")
    flat = node_feats.ndim == 2 and edge_filter.ndim == 2
    if flat:
        node_feats, edge_filter = node_feats[:, None], edge_filter[:, None]
    k_node, k_edge = node_feats.shape[1], edge_filter.shape[1]
    if (
        node_feats.ndim != 3
        or edge_filter.ndim != 3
        or node_feats.shape[2] != edge_filter.shape[2]
        or (k_node != k_edge and 1 not in (k_node, k_edge))
    ):
        raise ValueError(
            f"node_feats (N, [K,] C) and edge_filter (E, [K,] C) must share C and broadcast over K, got "
            f"{tuple(node_feats.shape)} and {tuple(edge_filter.shape)}"
        )
    num_nodes = node_feats.shape[0] if num_nodes is None else num_nodes
    out = _BACKENDS[backend](node_feats.contiguous(), edge_filter.contiguous(), edge_index, num_nodes)
    return out[:, 0] if flat else out
