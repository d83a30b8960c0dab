// A small warp emulator: runs CUDA kernel source on the CPU, one warp at a time, each of its
// 32 lanes a fiber that runs until it reaches a warp intrinsic (__shfl*_sync, __ballot_sync,
// __any_sync); when every lane is there the intrinsic is evaluated and the lanes go on.  A
// lane that reaches a different intrinsic (another source line) than the others, or one
// while other lanes have exited, is reported: on a GPU that would be a bug of its own (these
// kernels only use full-warp masks).  Loads are plain reads; double arithmetic is IEEE as on
// the GPU (compile with -ffp-contract=off; fused multiply-adds are written as __fma_rn).
// Test code only (tests/test_select_emulation.py builds it with the host compiler).
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

struct simt_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline simt_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {
// Optional: called with (lane, address, size) for every __ldg (the harness's load statistics).
inline void (*g_load_hook)(int, const void*, int) = nullptr;
inline int g_lane = 0;
}  // namespace simt

template <class T>
inline T __ldg(const T* p) {
  if (simt::g_load_hook) simt::g_load_hook(simt::g_lane, p, (int)sizeof(T));
  return *p;
}
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace simt {

enum Op { kNone, kShfl, kShflUp, kShflXor, kBallot, kAny, kAll };

struct Lane {
  jmp_buf ctx;
  ucontext_t uc;
  bool done;
  int op, line, arg;
  unsigned mask;
  uint64_t val, res;
};

struct Warp {
  Lane lane[32];
  jmp_buf sched;
  ucontext_t sched_uc;
  int cur;
  unsigned block, first_thread;
  std::function<void()> body;
  std::vector<std::vector<char>> stacks;
  long long intrinsics = 0;
};

inline Warp* g_warp = nullptr;
inline int g_errors = 0;

inline void set_ids(Warp& w, int l) {
  w.cur = l;
  g_lane = l;
  threadIdx.x = w.first_thread + l;
  blockIdx.x = w.block;
}

inline void trampoline() {
  Warp& w = *g_warp;
  const int l = w.cur;
  if (!_setjmp(w.lane[l].ctx)) _longjmp(w.sched, 1);  // registered: back to the scheduler
  w.body();
  w.lane[l].done = true;
  _longjmp(w.sched, 1);
}

// Called by a lane at a warp intrinsic: park until all lanes are there, return the result.
inline uint64_t sync(int op, unsigned mask, uint64_t val, int arg, int line) {
  Warp& w = *g_warp;
  Lane& me = w.lane[w.cur];
  me.op = op;
  me.mask = mask;
  me.val = val;
  me.arg = arg;
  me.line = line;
  if (!_setjmp(me.ctx)) _longjmp(w.sched, 1);
  return me.res;
}

// Runs `body` for the 32 lanes of warp (block, first_thread / 32).
inline void run_warp(unsigned block, unsigned first_thread, std::function<void()> body) {
  static Warp w;
  if (w.stacks.empty()) w.stacks.assign(32, std::vector<char>(1 << 18));
  g_warp = &w;
  w.block = block;
  w.first_thread = first_thread;
  w.body = std::move(body);
  for (int l = 0; l < 32; ++l) {
    Lane& L = w.lane[l];
    L.done = false;
    L.op = kNone;
    getcontext(&L.uc);
    L.uc.uc_stack.ss_sp = w.stacks[l].data();
    L.uc.uc_stack.ss_size = w.stacks[l].size();
    L.uc.uc_link = nullptr;
    makecontext(&L.uc, trampoline, 0);
    set_ids(w, l);
    if (!_setjmp(w.sched)) swapcontext(&w.sched_uc, &L.uc);
  }
  for (int l = 0; l < 32; ++l) {  // start every lane: each runs to its first intrinsic or end
    set_ids(w, l);
    if (!_setjmp(w.sched)) _longjmp(w.lane[l].ctx, 1);
  }
  for (;;) {
    int waiting = 0, done = 0, op = kNone, line = -1;
    bool mismatch = false;
    for (int l = 0; l < 32; ++l) {
      const Lane& L = w.lane[l];
      if (L.done) { ++done; continue; }
      ++waiting;
      if (op == kNone) { op = L.op; line = L.line; }
      if (L.op != op || L.line != line || L.mask != 0xffffffffu) mismatch = true;
    }
    if (waiting == 0) break;
    if (done || mismatch) {
      if (g_errors++ < 10)
        std::fprintf(stderr, "simt: divergent warp intrinsic (block %u, warp thread %u, line %d, "
                     "%d lanes exited)\n", block, first_thread, line, done);
      std::abort();
    }
    ++w.intrinsics;
    uint64_t v[32];
    for (int l = 0; l < 32; ++l) v[l] = w.lane[l].val;
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= (v[l] != 0 ? 1u : 0u) << l;
    for (int l = 0; l < 32; ++l) {
      Lane& L = w.lane[l];
      switch (op) {
        case kShfl: L.res = v[L.arg & 31]; break;
        case kShflUp: L.res = l - L.arg >= 0 ? v[l - L.arg] : v[l]; break;
        case kShflXor: L.res = v[(l ^ L.arg) & 31]; break;
        case kBallot: L.res = ballot; break;
        case kAny: L.res = ballot != 0; break;
        case kAll: L.res = ballot == 0xffffffffu; break;
        default: std::abort();
      }
    }
    for (int l = 0; l < 32; ++l) {
      set_ids(w, l);
      if (!_setjmp(w.sched)) _longjmp(w.lane[l].ctx, 1);
    }
  }
}

// Launches kernel(args) over grid x block threads (1-D), warp after warp.
template <class F>
inline void launch(unsigned grid, unsigned block, F&& kernel) {
  blockDim.x = block;
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t0 = 0; t0 < block; t0 += 32) run_warp(b, t0, kernel);
}

template <class T>
inline uint64_t bits(T x) {
  uint64_t u = 0;
  std::memcpy(&u, &x, sizeof(T));
  return u;
}
template <class T>
inline T unbits(uint64_t u) {
  T x;
  std::memcpy(&x, &u, sizeof(T));
  return x;
}

}  // namespace simt

#define __shfl_sync(mask, v, src) \
  simt::unbits<std::decay_t<decltype(v)>>(simt::sync(simt::kShfl, (mask), simt::bits(v), (src), __LINE__))
#define __shfl_up_sync(mask, v, d) \
  simt::unbits<std::decay_t<decltype(v)>>(simt::sync(simt::kShflUp, (mask), simt::bits(v), (d), __LINE__))
#define __shfl_xor_sync(mask, v, d) \
  simt::unbits<std::decay_t<decltype(v)>>(simt::sync(simt::kShflXor, (mask), simt::bits(v), (d), __LINE__))
#define __ballot_sync(mask, p) \
  ((unsigned)simt::sync(simt::kBallot, (mask), (uint64_t)((p) ? 1 : 0), 0, __LINE__))
#define __any_sync(mask, p) ((int)simt::sync(simt::kAny, (mask), (uint64_t)((p) ? 1 : 0), 0, __LINE__))
#define __all_sync(mask, p) ((int)simt::sync(simt::kAll, (mask), (uint64_t)((p) ? 1 : 0), 0, __LINE__))
