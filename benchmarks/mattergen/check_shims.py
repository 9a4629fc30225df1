"""Self-check of the torch_scatter / torch_sparse stand-ins against brute force (run by setup.sh).

Checks exactly what MatterGen relies on: GemNet's triplet enumeration (`SparseTensor(...)[rows]`,
output rows grouped in order, as its `ragged_range` needs) and the scatter/segment reductions.
"""

import torch
import torch_scatter
import torch_sparse


def check_triplets(num_atoms: int = 7, num_edges: int = 40) -> None:
    source = torch.randint(0, num_atoms, (num_edges,))
    target = torch.randint(0, num_atoms, (num_edges,))
    adj = torch_sparse.SparseTensor(
        row=target, col=source, value=torch.arange(num_edges), sparse_sizes=(num_atoms, num_atoms)
    )
    selected = adj[target]
    got = sorted(zip(selected.storage.value().tolist(), selected.storage.row().tolist()))
    # every pair of edges (b -> a, c -> a) sharing the target a, as (edge b, edge c)
    want = sorted((b, c) for c in range(num_edges) for b in range(num_edges) if target[b] == target[c])
    assert got == want, "triplets differ from brute force"
    rows = selected.storage.row()
    assert torch.all(rows[1:] >= rows[:-1]), "selected rows are not grouped in order"


def check_reductions(num_items: int = 40, num_slots: int = 5) -> None:
    x = torch.randn(num_items, 4)
    index = torch.randint(0, num_slots, (num_items,))
    ref = torch.zeros(num_slots, 4).index_add_(0, index, x)
    assert torch.allclose(torch_scatter.scatter(x, index, dim=0, dim_size=num_slots, reduce="sum"), ref)
    assert torch.allclose(torch_scatter.scatter_add(x.T, index, dim=-1, dim_size=num_slots), ref.T)
    count = torch.bincount(index, minlength=num_slots).clamp_min(1)
    mean = torch_scatter.scatter(x, index, dim=0, dim_size=num_slots, reduce="mean")
    assert torch.allclose(mean, ref / count[:, None])

    sorted_index, order = torch.sort(index)
    indptr = torch.zeros(num_slots + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(sorted_index, minlength=num_slots).cumsum(0)
    assert torch.allclose(torch_scatter.segment_csr(x[order], indptr, reduce="sum"), ref)
    assert torch.allclose(torch_scatter.segment_coo(x[order], sorted_index, dim_size=num_slots), ref)

    values, argmax = torch_scatter.scatter_max(x[:, 0], index, dim=0, dim_size=num_slots)
    for slot in range(num_slots):
        members = index == slot
        if members.any():
            assert values[slot] == x[members, 0].max() and x[argmax[slot], 0] == values[slot]


if __name__ == "__main__":
    torch.manual_seed(0)
    check_triplets()
    check_reductions()
    print("torch_scatter/torch_sparse stand-ins agree with brute force")
