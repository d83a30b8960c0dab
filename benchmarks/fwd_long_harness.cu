// Standalone timing of the Hopper forward kernel (csrc/sparsek/sm90/fwd_kernel_sm90.cuh) at
// D = 128, bf16, on the long-S config's real work items: the selection, key lists and layout
// written by benchmarks/fwd_dump.py (sparse or exact mode); q, k, v are drawn here (K/V shared
// by the RP packed heads, as the package passes them).  No torch: kernel variants (copies of
// csrc/ with edits, or -D switches) build in seconds on the device and run side by side.
// Prints milliseconds per launch (back to back), an output checksum, and with a reference
// file the largest difference from it (write one with a third argument "save").
//   python3 benchmarks/fwd_dump.py /tmp/fwd64k 65536 sparse
//   nvcc -O3 --use_fast_math -std=c++17 --expt-relaxed-constexpr -arch=sm_90a \
//        -Icsrc -Icsrc/sparsek/sm90 -o /tmp/fwd_long benchmarks/fwd_long_harness.cu
//   /tmp/fwd_long /tmp/fwd64k label [save|check]
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "fwd_kernel_sm90.cuh"
#include "harness_io.h"
using namespace xsk;

// Standard normal draws from a counter hash (Box-Muller), generated on the device: the
// 64K problem's q alone is 268 M elements.
__global__ void fill_normal(__nv_bfloat16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 0x9E3779B9u ^ (uint32_t)(i >> 32) ^ seed * 0x85EBCA6Bu;
    h ^= h >> 16, h *= 0x7FEB352Du, h ^= h >> 15, h *= 0x846CA68Bu, h ^= h >> 16;
    uint32_t g = h * 0x2C1B3C6Du + 0x297A2D39u;
    g ^= g >> 16, g *= 0x7FEB352Du, g ^= g >> 15;
    const float u1 = ((h >> 8) + 1) * (1.f / 16777217.f), u2 = (g >> 8) * (1.f / 16777216.f);
    x[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

static __nv_bfloat16* random_bf16(size_t n, unsigned seed) {
  __nv_bfloat16* d;
  cudaMalloc(&d, n * 2);
  fill_normal<<<1024, 256>>>(d, n, seed);
  return d;
}

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp/fwd64k";
  const char* label = argc > 2 ? argv[2] : "";
  const std::string action = argc > 3 ? argv[3] : "";
  int NQ, S, R, D, NK, ntiles, cap, RP, sparse;
  double scale;
  FILE* m = fopen((dir + "/meta.txt").c_str(), "r");
  if (!m || fscanf(m, "%d %d %d %d %d %d %d %d %lf %d", &NQ, &S, &R, &D, &NK, &ntiles, &cap,
                   &RP, &scale, &sparse) != 10 || D != 128) {
    fprintf(stderr, "bad %s/meta.txt (D must be 128)\n", dir.c_str());
    return 1;
  }
  fclose(m);
  const size_t nq = (size_t)NQ * S * R * D, nk = (size_t)NK * S * D;
  FwdParams p{};
  __nv_bfloat16* o;
  cudaMalloc(&o, nq * 2);
  p.q = random_bf16(nq, 1);
  p.k = random_bf16(nk, 2);
  p.v = random_bf16(nk, 3);
  p.o = o;
  p.q_sn = p.o_sn = (int64_t)S * R * D;
  p.q_ss = p.o_ss = (int64_t)R * D;
  p.q_sr = p.o_sr = D;
  p.k_sn = p.v_sn = (int64_t)S * D;  // [NK, S, R, D] with stride 0 over R (expanded)
  p.k_ss = p.v_ss = D;
  p.k_sr = p.v_sr = 0;
  float* lse;
  cudaMalloc(&lse, (size_t)S * R * NQ * 4);
  p.lse = lse;
  p.pool_lo = load<int64_t>(dir, "pool_lo", NQ);
  p.win_lo = load<int64_t>(dir, "win_lo", NQ);
  p.win_hi = load<int64_t>(dir, "win_hi", NQ);
  p.tile_q0 = load<int>(dir, "tile_q0", ntiles);
  p.tile_q1 = load<int>(dir, "tile_q1", ntiles);
  if (sparse) {
    p.u = load<float>(dir, "u", (size_t)S * NK);
    p.tau = load<double>(dir, "tau", (size_t)S * NQ);
    p.rb = load<int64_t>(dir, "rb", (size_t)S * NQ);
    p.ranks = load<int>(dir, "ranks", (size_t)S * NK);
    p.lists = load<int>(dir, "lists", (size_t)S * ntiles * cap);
    p.counts = load<int>(dir, "counts", (size_t)S * ntiles);
    p.cap = cap;
  }
  p.S = S, p.R = R, p.RP = RP, p.NQ = NQ, p.NK = NK, p.ntiles = ntiles;
  p.scale_log2 = (float)(scale * 1.4426950408889634);

  auto launch = [&] { return sm90::run_fwd_sm90<__nv_bfloat16, 128>(p, 0); };
  for (int i = 0; i < 2; ++i) launch();
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) { printf("error %s\n", cudaGetErrorString(err)); return 1; }
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int iters = 10;
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) launch();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  std::vector<__nv_bfloat16> ho(nq);
  cudaMemcpy(ho.data(), o, nq * 2, cudaMemcpyDeviceToHost);
  double cs = 0;
  for (size_t i = 0; i < nq; i += 97) cs += __bfloat162float(ho[i]) * (1 + i % 7);
  double maxdiff = -1;
  const std::string ref = dir + "/o_ref.bin";
  if (action == "save") {
    FILE* f = fopen(ref.c_str(), "wb");
    fwrite(ho.data(), 2, nq, f);
    fclose(f);
  } else if (action == "check") {
    std::vector<__nv_bfloat16> hr(nq);
    FILE* f = fopen(ref.c_str(), "rb");
    if (f && fread(hr.data(), 2, nq, f) == nq) {
      maxdiff = 0;
      for (size_t i = 0; i < nq; ++i)
        maxdiff = fmax(maxdiff, fabs(__bfloat162float(ho[i]) - __bfloat162float(hr[i])));
    }
    if (f) fclose(f);
  }
  printf("%-16s %8.3f ms/launch  checksum %.6f", label, ms / iters, cs);
  if (maxdiff >= 0) printf("  max|o - ref| %.3g", maxdiff);
#if __has_include("key_tma.h")  // (older trees, timed beside this one, have no TMA path)
  printf("  TMA key maps: %s", sm90::with_key_maps<__nv_bfloat16, 128>(p).tma_keys ? "yes" : "no");
#endif
  printf("\n");
  return 0;
}
