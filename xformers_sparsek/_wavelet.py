"""A wavelet matrix over integer ranks, in plain (device-agnostic) PyTorch.

It answers, for any index range [lo, hi) of a static array, in O(log N) each:
  * ``count_sum_below(lo, hi, theta)``: how many elements have rank < theta, and the sum of
    their weights;
  * ``kth_smallest(lo, hi, k)``: the rank of the k-th smallest (0-based) element.

SparseK needs exactly these on arbitrary key intervals (the pool of each query) to get the
capped-simplex threshold and the top-k boundary without ever materialising a
queries x keys matrix; the backward pass reuses it over the per-query thresholds.
All queries are answered at once (vectorised over a batch of ranges).

Layout: level l (from the most significant rank bit down) stores, for every prefix length
p, how many of the first p elements (in that level's order) have bit l == 0 (``zeros``),
and the weight sum of those (``wsum``); the next level's order is the stable partition of
this one by that bit.
"""

from typing import Tuple

import torch


class WaveletMatrix:
    def __init__(self, ranks: torch.Tensor, weights: torch.Tensor):
        """ranks: int64 [N], a permutation of 0..N-1; weights: float64 [N]."""
        n = ranks.numel()
        self.n = n
        self.nbits = max(1, n.bit_length())
        dev = ranks.device
        zeros, wsums, nzeros = [], [], []
        r, w = ranks, weights
        pad = torch.zeros(1, dtype=torch.int64, device=dev)
        padw = torch.zeros(1, dtype=weights.dtype, device=dev)
        for level in reversed(range(self.nbits)):
            is0 = ((r >> level) & 1) == 0
            zc = torch.cumsum(is0, 0)
            zeros.append(torch.cat([pad, zc]))
            wsums.append(torch.cat([padw, torch.cumsum(torch.where(is0, w, 0.0), 0)]))
            nz = int(zc[-1]) if n else 0
            nzeros.append(nz)
            # stable partition: zeros first, then ones, each in their original order
            ones_before = torch.arange(n, device=dev) - (zc - is0.long())
            dest = torch.where(is0, zc - 1, nz + ones_before)
            r = torch.empty_like(r).index_copy_(0, dest, r)
            w = torch.empty_like(w).index_copy_(0, dest, w)
        # [L, N+1] tables; level index 0 is the most significant bit.
        self.zeros = torch.stack(zeros)
        self.wsum = torch.stack(wsums)
        self.nzeros = torch.tensor(nzeros, dtype=torch.int64, device=dev)

    def count_sum_below(
        self, lo: torch.Tensor, hi: torch.Tensor, theta: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Count and weight sum of elements in [lo, hi) with rank < theta (theta in 0..N)."""
        cnt = torch.zeros_like(lo)
        acc = torch.zeros(lo.shape, dtype=self.wsum.dtype, device=lo.device)
        for li in range(self.nbits):
            level = self.nbits - 1 - li
            z, ws = self.zeros[li], self.wsum[li]
            zlo, zhi = z[lo], z[hi]
            take = ((theta >> level) & 1) == 1
            # bit of theta is 1: every element with bit 0 here is below theta
            cnt = cnt + torch.where(take, zhi - zlo, 0)
            acc = acc + torch.where(take, ws[hi] - ws[lo], 0.0)
            nz = self.nzeros[li]
            lo = torch.where(take, nz + lo - zlo, zlo)
            hi = torch.where(take, nz + hi - zhi, zhi)
        return cnt, acc

    def kth_smallest(
        self, lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """Rank of the k-th smallest element of [lo, hi); requires 0 <= k < hi - lo."""
        rank = torch.zeros_like(lo)
        for li in range(self.nbits):
            level = self.nbits - 1 - li
            z = self.zeros[li]
            zlo, zhi = z[lo], z[hi]
            nzero_here = zhi - zlo
            go1 = k >= nzero_here
            k = torch.where(go1, k - nzero_here, k)
            rank = rank | (go1.to(rank.dtype) << level)
            nz = self.nzeros[li]
            lo = torch.where(go1, nz + lo - zlo, zlo)
            hi = torch.where(go1, nz + hi - zhi, zhi)
        return rank
