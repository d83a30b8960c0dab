// Standalone timing of the Hopper forward kernel (csrc/sparsek/sm90/fwd_kernel_sm90.cuh) on
// the seed config's exact problem: B=16, M=512, H=96, D=64, fp16, no mask, i.e. the canonical
// [NQ=8192, S=96, R=1, D] of xformers_sparsek._problem.  No torch: kernel variants (copies of
// csrc/ with edits, or -D switches) build in seconds on the device and run side by side.
// Prints microseconds per launch (50 back to back) and an output checksum (equal checksums:
// the same output up to the sampled elements).  From the repository root, on an sm_90a GPU:
//   nvcc -O3 --use_fast_math -std=c++17 --expt-relaxed-constexpr -arch=sm_90a \
//        -Icsrc -Icsrc/sparsek/sm90 -o /tmp/fwd_seed benchmarks/fwd_seed_harness.cu
//   /tmp/fwd_seed label
#include <cstdio>
#include <vector>
#include <random>
#include "fwd_kernel_sm90.cuh"
using namespace xsk;
int main(int argc, char** argv) {
  const int B = 16, M = 512, H = 96, D = 64, NQ = B * M, S = H, BM = 128;
  const int ntiles = NQ / BM;
  size_t n = (size_t)NQ * S * D;
  std::vector<__half> hq(n);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  for (auto& x : hq) x = __float2half(nd(rng));
  __half *q, *k, *v, *o;
  cudaMalloc(&q, n * 2); cudaMalloc(&k, n * 2); cudaMalloc(&v, n * 2); cudaMalloc(&o, n * 2);
  cudaMemcpy(q, hq.data(), n * 2, cudaMemcpyHostToDevice);
  for (auto& x : hq) x = __float2half(nd(rng));
  cudaMemcpy(k, hq.data(), n * 2, cudaMemcpyHostToDevice);
  for (auto& x : hq) x = __float2half(nd(rng));
  cudaMemcpy(v, hq.data(), n * 2, cudaMemcpyHostToDevice);
  float* lse; cudaMalloc(&lse, (size_t)S * NQ * 4);
  std::vector<int64_t> plo(NQ), wlo(NQ), whi(NQ);
  for (int i = 0; i < NQ; ++i) { plo[i] = i / M * M; wlo[i] = whi[i] = plo[i] + M; }
  std::vector<int> t0(ntiles), t1(ntiles);
  for (int t = 0; t < ntiles; ++t) { t0[t] = t * BM; t1[t] = t * BM + BM; }
  int64_t *dplo, *dwlo, *dwhi; int *dt0, *dt1;
  cudaMalloc(&dplo, NQ * 8); cudaMalloc(&dwlo, NQ * 8); cudaMalloc(&dwhi, NQ * 8);
  cudaMalloc(&dt0, ntiles * 4); cudaMalloc(&dt1, ntiles * 4);
  cudaMemcpy(dplo, plo.data(), NQ * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(dwlo, wlo.data(), NQ * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(dwhi, whi.data(), NQ * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(dt0, t0.data(), ntiles * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dt1, t1.data(), ntiles * 4, cudaMemcpyHostToDevice);
  FwdParams p{};
  p.q = q; p.k = k; p.v = v; p.o = o;
  p.q_sn = p.k_sn = p.v_sn = p.o_sn = (int64_t)S * D;
  p.q_ss = p.k_ss = p.v_ss = p.o_ss = D;
  p.q_sr = p.k_sr = p.v_sr = p.o_sr = D;
  p.lse = lse; p.u = nullptr;
  p.pool_lo = dplo; p.win_lo = dwlo; p.win_hi = dwhi; p.tile_q0 = dt0; p.tile_q1 = dt1;
  p.S = S; p.R = 1; p.RP = 1; p.NQ = NQ; p.NK = NQ; p.ntiles = ntiles;
  p.scale_log2 = 0.125f * 1.4426950408889634f;
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) sm90::run_fwd_sm90<__half, 64>(p, 0);
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) { printf("error %s\n", cudaGetErrorString(err)); return 1; }
  const int iters = 50;
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) sm90::run_fwd_sm90<__half, 64>(p, 0);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  std::vector<__half> ho(n); cudaMemcpy(ho.data(), o, n * 2, cudaMemcpyDeviceToHost);
  double cs = 0; for (size_t i = 0; i < n; i += 97) cs += __half2float(ho[i]) * (1 + i % 7);
  printf("%-14s %8.1f us/launch  checksum %.6f\n", argc > 1 ? argv[1] : "", 1e3 * ms / iters, cs);
  return 0;
}
