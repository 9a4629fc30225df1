"""Pure-PyTorch stand-in for the one `torch_sparse` feature MatterGen 1.0.3 uses.

Why this exists: the compiled `torch_sparse` extension publishes no wheels for torch 2.13. MatterGen's
GemNet builds its triplets with `SparseTensor(row, col, value, sparse_sizes)[rows]` and reads
`.storage.row()` / `.storage.value()` of the result: a CSR row selection. That is all this module
provides. It deliberately has no `SparseStorage`, so torch_geometric (which probes for it) keeps
torch_sparse support switched off and never routes its own code through this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

__version__ = "0.6.18+xtalgen.shim"


class _Storage:
    def __init__(self, row: Tensor, col: Tensor, value: Tensor):
        self._row, self._col, self._value = row, col, value

    def row(self) -> Tensor:
        return self._row

    def col(self) -> Tensor:
        return self._col

    def value(self) -> Tensor:
        return self._value


class SparseTensor:
    """A COO matrix sorted by (row, col), as torch_sparse stores it, supporting row selection."""

    def __init__(self, row: Tensor, col: Tensor, value: Tensor, sparse_sizes):
        num_rows, num_cols = (int(s) for s in sparse_sizes)
        order = torch.argsort(row * num_cols + col, stable=True)
        self.sparse_sizes = (num_rows, num_cols)
        self.storage = _Storage(row[order], col[order], value[order])
        self._rowptr = torch.zeros(num_rows + 1, dtype=torch.long, device=row.device)
        self._rowptr[1:] = torch.cumsum(torch.bincount(row, minlength=num_rows), 0)

    def to(self, device) -> SparseTensor:
        moved = SparseTensor.__new__(SparseTensor)
        moved.sparse_sizes = self.sparse_sizes
        moved.storage = _Storage(*(t.to(device) for t in (self.storage.row(), self.storage.col(), self.storage.value())))
        moved._rowptr = self._rowptr.to(device)
        return moved

    def __getitem__(self, rows: Tensor) -> SparseTensor:
        """Rows `rows` (with repeats) stacked into a new matrix; row i of it is row rows[i] of self."""
        start = self._rowptr[rows]  # (R,)
        counts = self._rowptr[rows + 1] - start  # (R,)
        new_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
        # position of each entry inside its row: a ragged arange
        offsets = torch.cumsum(counts, 0) - counts
        within = torch.arange(new_row.numel(), device=rows.device) - offsets[new_row]
        source = start[new_row] + within
        selected = SparseTensor.__new__(SparseTensor)
        selected.sparse_sizes = (rows.numel(), self.sparse_sizes[1])
        selected.storage = _Storage(new_row, self.storage.col()[source], self.storage.value()[source])
        selected._rowptr = torch.zeros(rows.numel() + 1, dtype=torch.long, device=rows.device)
        selected._rowptr[1:] = torch.cumsum(counts, 0)
        return selected
