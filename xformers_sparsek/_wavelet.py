"""Wavelet matrices over integer ranks, one per row of a batch, in plain PyTorch.

For row b and any index range [lo, hi) of that row's static array they answer, in
O(log N) each:
  * ``count_sum_below(b, lo, hi, theta)``: how many elements have rank < theta, and the sum
    of their weights;
  * ``kth_smallest(b, lo, hi, k)``: the rank of the k-th smallest (0-based) element.

SparseK needs exactly these on arbitrary key intervals (the pool of each query) to get the
capped-simplex threshold and the top-k boundary without ever materialising a
queries x keys matrix; the backward pass reuses it over the per-query thresholds.
All queries are answered at once (vectorised over a batch of ranges); the CUDA selection
kernel reads the same tables.

Layout: level l (from the most significant rank bit down) stores, for every prefix length
p, how many of the first p elements (in that level's order) have bit l == 0 (``zeros``),
and the weight sum of those (``wsum``); the next level's order is the stable partition of
this one by that bit.
"""

from typing import Tuple

import torch


def _take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # index_select is several times faster than advanced indexing for 1-D gathers on CPU
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


class WaveletMatrix:
    def __init__(self, ranks: torch.Tensor, weights: torch.Tensor):
        """ranks: int64 [B, N], each row a permutation of 0..N-1; weights: float64 [B, N]."""
        B, n = ranks.shape
        self.n = n
        self.nbits = nbits = max(1, n.bit_length())
        dev = ranks.device
        self.zeros = torch.zeros(B, nbits, n + 1, dtype=torch.int64, device=dev)
        self.wsum = torch.zeros(B, nbits, n + 1, dtype=weights.dtype, device=dev)
        self.nzeros = torch.zeros(B, nbits, dtype=torch.int64, device=dev)
        idx = torch.arange(n, device=dev)
        r, w = ranks, weights
        for li in range(nbits):
            is0 = ((r >> (nbits - 1 - li)) & 1) == 0
            zc = torch.cumsum(is0, 1)
            self.zeros[:, li, 1:] = zc
            self.wsum[:, li, 1:] = torch.cumsum(torch.where(is0, w, 0.0), 1)
            nz = zc[:, -1:] if n else torch.zeros(B, 1, dtype=torch.int64, device=dev)
            self.nzeros[:, li] = nz[:, 0]
            # stable partition: zeros first, then ones, each in their original order
            dest = torch.where(is0, zc - 1, nz + idx - zc)
            r = torch.empty_like(r).scatter_(1, dest, r)
            w = torch.empty_like(w).scatter_(1, dest, w)

    def _level(self, row, li):
        return (row * self.nbits + li) * (self.n + 1)

    def count_sum_below(
        self, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, theta: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Count and weight sum of elements in [lo, hi) of `row` with rank < theta."""
        z, ws, nzs = self.zeros.view(-1), self.wsum.view(-1), self.nzeros.view(-1)
        cnt = torch.zeros_like(lo)
        acc = torch.zeros(lo.shape, dtype=self.wsum.dtype, device=lo.device)
        for li in range(self.nbits):
            base = self._level(row, li)
            zlo, zhi = _take(z, base + lo), _take(z, base + hi)
            take = ((theta >> (self.nbits - 1 - li)) & 1) == 1
            # bit of theta is 1: every element with bit 0 here is below theta
            cnt = cnt + torch.where(take, zhi - zlo, 0)
            acc = acc + torch.where(take, _take(ws, base + hi) - _take(ws, base + lo), 0.0)
            nz = _take(nzs, row * self.nbits + li)
            lo = torch.where(take, nz + lo - zlo, zlo)
            hi = torch.where(take, nz + hi - zhi, zhi)
        return cnt, acc

    def kth_smallest(
        self, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """Rank of the k-th smallest element of [lo, hi) of `row`; needs 0 <= k < hi - lo."""
        z, nzs = self.zeros.view(-1), self.nzeros.view(-1)
        rank = torch.zeros_like(lo)
        for li in range(self.nbits):
            base = self._level(row, li)
            zlo, zhi = _take(z, base + lo), _take(z, base + hi)
            nzero_here = zhi - zlo
            go1 = k >= nzero_here
            k = torch.where(go1, k - nzero_here, k)
            rank = rank | (go1.to(rank.dtype) << (self.nbits - 1 - li))
            nz = _take(nzs, row * self.nbits + li)
            lo = torch.where(go1, nz + lo - zlo, zlo)
            hi = torch.where(go1, nz + hi - zhi, zhi)
        return rank
