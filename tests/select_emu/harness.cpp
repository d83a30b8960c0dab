// Runs the selection kernels of csrc/sparsek/select_kernels.cuh (new) and select_old.cuh
// (before the faster search) on the CPU under the warp emulator, on tables built by the
// caller (tests/test_select_emulation.py, through ctypes).  Test code only.
#include "simt.h"
// clang-format off
#include "sparsek/select_kernels.cuh"
#include "select_old.cuh"
// clang-format on

#include <set>
#include <map>

namespace {

// Load statistics of the wavelet descents (per warp: the most zeros-table loads of one lane
// = its levels walked, 2 per chain and level in the old kernels, 2 per chain and level in
// the new ones too but several chains per level; and 32-byte sectors per warp-wide load).
struct Stats {
  const char* z_lo = nullptr;
  const char* z_hi = nullptr;
  const char* nz_lo = nullptr;
  const char* nz_hi = nullptr;
  long long lane_z[32], lane_nz[32], lane_all[32];
  std::vector<uintptr_t> trace[32];
  double warps = 0, z_max = 0, nz_max = 0, loads_max = 0, sectors = 0, warp_loads = 0;
  bool on = false;
  long long hist[6] = {0};  // lanes by levels walked / nbits (0, 1, 2, ..., 5+)
  int nbits = 1;
} st;

void hook(int lane, const void* ptr, int) {
  const char* a = (const char*)ptr;
  if (a >= st.z_lo && a < st.z_hi) ++st.lane_z[lane];
  if (a >= st.nz_lo && a < st.nz_hi) ++st.lane_nz[lane];
  ++st.lane_all[lane];
  st.trace[lane].push_back((uintptr_t)ptr >> 5);
}

void warp_begin() {
  for (int l = 0; l < 32; ++l) {
    st.lane_z[l] = st.lane_nz[l] = st.lane_all[l] = 0;
    st.trace[l].clear();
  }
}

void warp_end() {
  long long z = 0, nz = 0, all = 0;
  size_t len = 0;
  for (int l = 0; l < 32; ++l) {
    z = std::max(z, st.lane_z[l]);
    nz = std::max(nz, st.lane_nz[l]);
    all = std::max(all, st.lane_all[l]);
    len = std::max(len, st.trace[l].size());
  }
  if (all == 0) return;
  for (int l = 0; l < 32; ++l)
    if (st.lane_all[l]) ++st.hist[std::min<long long>(5, st.lane_nz[l] / st.nbits)];
  st.warps += 1;
  st.z_max += z;
  st.nz_max += nz;
  st.loads_max += all;
  for (size_t k = 0; k < len; ++k) {  // the k-th load of every lane: one warp-wide load
    std::set<uintptr_t> sec;
    for (int l = 0; l < 32; ++l)
      if (k < st.trace[l].size()) sec.insert(st.trace[l][k]);
    st.sectors += sec.size();
    st.warp_loads += 1;
  }
}

template <class K>
void launch_stats(unsigned grid, unsigned block, K kernel) {
  blockDim.x = block;
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t0 = 0; t0 < block; t0 += 32) {
      if (st.on) warp_begin();
      simt::run_warp(b, t0, kernel);
      if (st.on) warp_end();
    }
}

}  // namespace

extern "C" {

// which: 0 = old kernels, 1 = new (pass 0 with anchors_per_warp).  stats (may be null): [pass0 warps, levels (max lane nz
// loads), zeros loads, loads, sectors, warp loads, then the same for pass 1].
int run_select(int which, const int* zeros, const double* wsum, const int* nzeros, int nbits,
               const double* cb, const int* th_mid, const int* th_mid1, const double* sv,
               const int* perm, const int64_t* pool_lo, const int64_t* win_lo,
               int S, int NQ, int NK, int topk, int* piece, double* tau, double* ub, int64_t* jb,
               int64_t* nF, int64_t* rb, int anchors_per_warp, double* stats) {
  xsk::SelectParams p{};
  p.zeros = zeros;
  p.wsum = wsum;
  p.nzeros = nzeros;
  p.nbits = nbits;
  p.cb = cb;
  p.th_mid = th_mid;
  p.th_mid1 = th_mid1;
  p.sv = sv;
  p.perm = perm;
  p.pool_lo = pool_lo;
  p.win_lo = win_lo;
  p.S = S;
  p.NQ = NQ;
  p.NK = NK;
  p.topk = topk;
  p.piece = piece;
  p.tau = tau;
  p.ub = ub;
  p.jb = jb;
  p.nF = nF;
  p.rb = rb;
  simt::g_errors = 0;
  st.on = stats != nullptr;
  if (st.on) {
    const size_t tbl = (size_t)S * nbits * (NK + 1);
    st.z_lo = (const char*)zeros;
    st.z_hi = (const char*)(zeros + tbl);
    st.nz_lo = (const char*)nzeros;
    st.nz_hi = (const char*)(nzeros + (size_t)S * nbits);
    simt::g_load_hook = hook;
  }
  const int64_t total = (int64_t)S * NQ;
  if (total == 0) return 0;
  const int threads = 128;
  const int64_t n_regular = (NQ + 31) / 32;
  const int64_t n_anchor = n_regular + ((NQ - 1) % 32 != 0 ? 1 : 0);
  st.nbits = nbits;
  auto reset = [&] { for (auto& h : st.hist) h = 0; st.warps = st.z_max = st.nz_max = st.loads_max = st.sectors = st.warp_loads = 0; };
  auto save = [&](double* out) {
    if (!out) return;
    out[0] = st.warps; out[1] = st.nz_max; out[2] = st.z_max; out[3] = st.loads_max;
    out[4] = st.sectors; out[5] = st.warp_loads;
    for (int j = 0; j < 6; ++j) out[12 + j] = st.hist[j];  // (pass 1's histogram lands last)
  };
  reset();
  if (which == 0) {  // old launch_select
    const int64_t anchor_threads = (int64_t)S * n_anchor * 32;
    launch_stats((unsigned)((anchor_threads + threads - 1) / threads), threads,
                 [&] { xsk_old::select_anchor_kernel(p); });
    save(stats);
    reset();
    launch_stats((unsigned)((total + threads - 1) / threads), threads,
                 [&] { xsk_old::select_kernel(p); });
  } else {  // csrc/sparsek/select.cu: launch_select
    using namespace xsk::select_impl;
    const int apw = anchors_per_warp;
    const int64_t anchor_threads = (int64_t)S * ((n_anchor + apw - 1) / apw) * 32;
    launch_stats((unsigned)((anchor_threads + threads - 1) / threads), threads,
                 [&] { select_anchor_kernel(p, apw); });
    save(stats);
    reset();
    const int64_t gap_threads = (int64_t)S * n_regular * 32;
    launch_stats((unsigned)((gap_threads + threads - 1) / threads), threads,
                 [&] { select_kernel(p); });
  }
  save(stats ? stats + 6 : nullptr);
  simt::g_load_hook = nullptr;
  return simt::g_errors;
}
}
