// Standalone timing of the selection search (launch_select: csrc/sparsek/select.cu and
// select_kernels.cuh) on inputs written by benchmarks/select_dump.py; no torch, so kernel
// variants (-D switches, or copies of csrc/ with edits) build in seconds and run side by
// side.  Prints microseconds per launch (20 back to back) and whether every output equals
// the package kernel's, bit for bit.  From the repository root, on a GPU machine:
//   python3 benchmarks/select_dump.py /tmp/sel64k
//   nvcc -O3 --use_fast_math -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -lineinfo \
//        -Icsrc -o /tmp/select_h benchmarks/select_harness.cu
//   /tmp/select_h /tmp/sel64k label
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "harness_io.h"
#include "sparsek/select.cu"

template <typename T>
static bool same_bits(const T* d, const std::vector<T>& want) {
  std::vector<T> got(want.size());
  cudaMemcpy(got.data(), d, want.size() * sizeof(T), cudaMemcpyDeviceToHost);
  return memcmp(got.data(), want.data(), want.size() * sizeof(T)) == 0;
}

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp/sel64k";
  int S, NQ, NK, nbits, topk;
  FILE* f = fopen((dir + "/meta.txt").c_str(), "r");
  if (!f || fscanf(f, "%d %d %d %d %d", &S, &NQ, &NK, &nbits, &topk) != 5) {
    fprintf(stderr, "cannot read %s/meta.txt\n", dir.c_str());
    return 1;
  }
  fclose(f);
  const size_t tab = (size_t)S * nbits * (NK + 1), rows = (size_t)S * NK, outs = (size_t)S * NQ;
  xsk::SelectParams p{};
  p.zeros = load<int>(dir, "zeros", tab);
  p.wsum = load<double>(dir, "wsum", tab);
  p.nzeros = load<int>(dir, "nzeros", (size_t)S * nbits);
  p.cb = load<double>(dir, "cb", 2 * rows);
  p.th_mid = load<int>(dir, "th_mid", (size_t)S * (2 * NK - 1));
  p.th_mid1 = load<int>(dir, "th_mid1", (size_t)S * (2 * NK - 1));
  p.sv = load<double>(dir, "sv", rows);
  p.perm = load<int>(dir, "perm", rows);
  p.pool_lo = load<int64_t>(dir, "pool_lo", NQ);
  p.win_lo = load<int64_t>(dir, "win_lo", NQ);
  p.nbits = nbits, p.S = S, p.NQ = NQ, p.NK = NK, p.topk = topk;
  std::vector<double> w_tau, w_ub;
  std::vector<int64_t> w_jb, w_nF, w_rb;
  load<double>(dir, "tau", outs, &w_tau);
  load<double>(dir, "ub", outs, &w_ub);
  load<int64_t>(dir, "jb", outs, &w_jb);
  load<int64_t>(dir, "nF", outs, &w_nF);
  load<int64_t>(dir, "rb", outs, &w_rb);
  cudaMalloc(&p.piece, outs * sizeof(int));
  cudaMalloc(&p.tau, outs * sizeof(double));
  cudaMalloc(&p.ub, outs * sizeof(double));
  cudaMalloc(&p.jb, outs * sizeof(int64_t));
  cudaMalloc(&p.nF, outs * sizeof(int64_t));
  cudaMalloc(&p.rb, outs * sizeof(int64_t));
  for (int i = 0; i < 3; ++i) xsk::launch_select(p, 0);
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    printf("error %s\n", cudaGetErrorString(err));
    return 1;
  }
  const bool same = same_bits(p.tau, w_tau) && same_bits(p.ub, w_ub) && same_bits(p.jb, w_jb) &&
                    same_bits(p.nF, w_nF) && same_bits(p.rb, w_rb);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int iters = 20;
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) xsk::launch_select(p, 0);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  printf("%-14s %8.1f us/launch  outputs %s\n", argc > 2 ? argv[2] : "", 1e3 * ms / iters,
         same ? "bitwise equal to the package's" : "DIFFER");
  return 0;
}
