// Thin wrappers over the sm_90a instructions of the Hopper kernels: wgmma (warpgroup MMA,
// fp16/bf16 in, fp32 accumulate), its shared-memory matrix descriptors, and mbarriers.
// Compiled for every target, used only under XSK_SM90A (set when compiling for sm_90a).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define XSK_SM90A 1
#endif

namespace xsk {
namespace sm90 {

// Element offset of 16-byte chunk `ch` of row `row` in a tile of `rows` rows stored the way
// wgmma's 128-byte swizzle expects: blocks of 64 columns ([D/64][rows][64]), 128-byte rows,
// chunk c of row r at chunk c ^ (r % 8).  The tile must start at a 1024-byte boundary.
__device__ __forceinline__ int sw128(int rows, int row, int ch) {
  return (ch >> 3) * (rows * 64) + row * 64 + (((ch & 7) ^ (row & 7)) << 3);
}

// Shared-memory matrix descriptor, 128-byte swizzle (PTX ISA, "Matrix Descriptor Format"):
// start address, leading and stride byte offsets (all >> 4), layout type 1 in bits 62-63.
__device__ __forceinline__ uint64_t make_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr(smem) & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// The descriptor of the same layout `bytes` further on (a multiple of 16, staying inside
// shared memory): only the start address field moves, and it cannot carry into the others,
// so one 32-bit add does it (make_desc per wgmma costs half a dozen instructions).
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// Byte offset of K-step kk (16 columns) in a [D/64][rows][64] sw128 tile: the 64-column
// block kk / 4, then 32 bytes per step inside its 128-byte rows.
__host__ __device__ constexpr uint32_t kstep_bytes(int kk, int rows, int elem_bytes) {
  return static_cast<uint32_t>((kk >> 2) * rows * 64 * elem_bytes + (kk & 3) * 16 * elem_bytes);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of wgmma accumulators across wait/fence points.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Orders this thread's generic-proxy view of shared memory before later async-proxy (wgmma)
// reads of it.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Moves registers between warpgroups (the kernel must be launched with a register cap:
// __launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- mbarriers ------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(
                   smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Arrives on `bar` once all of this thread's earlier cp.async copies have landed, as one of
// the phase's expected arrivals (.noinc): a barrier that also takes each thread's mbar_arrive
// (releasing its plain shared-memory stores) expects 2 arrivals per thread.  (The variant
// without .noinc, paired with mbar_arrive, is reported by compute-sanitizer's synccheck.)
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}

// Adds tx bytes to the current phase's expected transaction count (the TMA copies that
// will complete on `bar`), without arriving.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t tx) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(tx)
               : "memory");
}

// Arrives on `bar` and adds tx bytes to the phase's expected transactions.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t tx) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(
          smem_addr(bar)),
      "r"(tx)
      : "memory");
}

// TMA: the box of tensor map `map` (a __grid_constant__ kernel parameter) at coordinates
// (c0, c1, c2, c3) -> shared address dst, completing `bar`'s transactions by its bytes.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, uint64_t* bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_addr(bar))
      : "memory");
}

// ---- wgmma m64nNk16 ----------------------------------------------------------------------
// WgmmaSS: D[64 x N] (+)= A[64 x 16] B[16 x N], A and B K-major in shared memory
//          (accumulate = 0 overwrites D).
// WgmmaRS: D[64 x N] += A[64 x 16] B[16 x N], A in registers (the accumulator layout of a
//          previous wgmma, packed to 16 bits), B MN-major in shared memory.
// The operand lists are spelled out: inline asm takes one operand per accumulator register.
template <typename T, int N>
struct WgmmaSS;
template <typename T, int N>
struct WgmmaRS;

// The accumulator operands of m64n128 (64 registers) and m64n64 (32) wgmmas.
#define XSK_WGMMA_D64_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define XSK_WGMMA_D64_OPS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define XSK_WGMMA_D32_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define XSK_WGMMA_D32_OPS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

#define XSK_WGMMA_SS_N64(T, TN)                                                                  \
template <>                                                                                      \
struct WgmmaSS<T, 64> {                                                                          \
  static __device__ __forceinline__ void run(float (&d)[32], uint64_t da, uint64_t db,           \
                                             int accumulate) {                                   \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                             \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN " {"                             \
        XSK_WGMMA_D32_REGS                                                                       \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                       \
        : XSK_WGMMA_D32_OPS                                                                      \
        : "l"(da), "l"(db), "r"(accumulate));                                                    \
  }                                                                                              \
};

#define XSK_WGMMA_RS_N128(T, TN)                                                                 \
template <>                                                                                      \
struct WgmmaRS<T, 128> {                                                                         \
  static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4],             \
                                             uint64_t db) {                                      \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                             \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TN "." TN " {"                            \
        XSK_WGMMA_D64_REGS                                                                       \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                         \
        : XSK_WGMMA_D64_OPS                                                                      \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                          \
  }                                                                                              \
};

#define XSK_WGMMA_RS_N64(T, TN)                                                                  \
template <>                                                                                      \
struct WgmmaRS<T, 64> {                                                                          \
  static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4],             \
                                             uint64_t db) {                                      \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                             \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN " {"                             \
        XSK_WGMMA_D32_REGS                                                                       \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
        : XSK_WGMMA_D32_OPS                                                                      \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                          \
  }                                                                                              \
};

// The same with the descriptors built inside the asm from 32-bit start words (desc_lo of a
// 128-byte-swizzle descriptor with a 1024-byte stride, plus a byte offset >> 4), so that no
// 64-bit descriptor lives outside its wgmma (written for the dk/dv kernel's 240-register
// consumers; ptxas put a batch's descriptors in registers up front, with make_desc there).
// Their effect on the register count alone was not measured: the 256-thread dk/dv kernel
// spilled 92 bytes with them, 96 without.  In the forward they replace a make_desc per
// wgmma (~35 uniform instructions fewer per key tile: 64K sparse 6.89 -> 6.82 ms).
template <typename T, int N>
struct WgmmaSSLo;
template <typename T, int N>
struct WgmmaRSLo;
// hi word of every such descriptor: stride 1024 bytes (>> 4 = 64), layout 1 (128B swizzle)
constexpr uint32_t kDescHi128 = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t desc_lo(uint64_t desc) { return static_cast<uint32_t>(desc); }

// (operand numbers: A0..A3 the A fragment, BL / BO / HI the descriptor pieces)
#define XSK_WGMMA_RS_LO(T, TN, NN, NREG, A0, A1, A2, A3, BL, BO, HI)                         \
template <>                                                                                      \
struct WgmmaRSLo<T, NN> {                                                                        \
  static __device__ __forceinline__ void run(float (&d)[NREG], const uint32_t (&a)[4],           \
                                             uint32_t b_lo, uint32_t b_off) {                    \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\n.reg .b32 bl, hi, one;\n.reg .b64 db;\n"                             \
        "mov.b32 one, 1;\nsetp.ne.b32 p, one, 0;\n"                                              \
        "add.u32 bl, %" BL ", %" BO ";\nmov.b32 hi, %" HI ";\nmov.b64 db, {bl, hi};\n"            \
        "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TN "." TN " {"                        \
        XSK_WGMMA_D##NREG##_REGS                                                                 \
        "}, {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, db, p, 1, 1, 1;\n}\n"                           \
        : XSK_WGMMA_D##NREG##_OPS                                                                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_lo), "r"(b_off), "n"(kDescHi128));   \
  }                                                                                              \
};

// (operand numbers: AL .. P the descriptor pieces and the accumulate flag)
#define XSK_WGMMA_SS_LO(T, TN, NN, NREG, AL, AO, BL, BO, P, HI)                              \
template <>                                                                                      \
struct WgmmaSSLo<T, NN> {                                                                        \
  static __device__ __forceinline__ void run(float (&d)[NREG], uint32_t a_lo, uint32_t a_off,    \
                                             uint32_t b_lo, uint32_t b_off, int accumulate) {    \
    asm volatile(                                                                                \
        "{\n.reg .pred p;\n.reg .b32 al, bl, hi;\n.reg .b64 da, db;\n"                          \
        "setp.ne.b32 p, %" P ", 0;\n"                                                            \
        "add.u32 al, %" AL ", %" AO ";\nadd.u32 bl, %" BL ", %" BO ";\nmov.b32 hi, %" HI ";\n"    \
        "mov.b64 da, {al, hi};\nmov.b64 db, {bl, hi};\n"                                         \
        "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TN "." TN " {"                        \
        XSK_WGMMA_D##NREG##_REGS                                                                 \
        "}, da, db, p, 1, 1, 0, 0;\n}\n"                                                         \
        : XSK_WGMMA_D##NREG##_OPS                                                                \
        : "r"(a_lo), "r"(a_off), "r"(b_lo), "r"(b_off), "r"(accumulate), "n"(kDescHi128));      \
  }                                                                                              \
};
// Both element types of one shape (NREG names the accumulator lists: XSK_WGMMA_D<NREG>_*).
#define XSK_WGMMA_SS_LO2(NN, NREG, ...)                   \
  XSK_WGMMA_SS_LO(__half, "f16", NN, NREG, __VA_ARGS__) \
  XSK_WGMMA_SS_LO(__nv_bfloat16, "bf16", NN, NREG, __VA_ARGS__)
XSK_WGMMA_SS_LO2(64, 32, "32", "33", "34", "35", "36", "37")
XSK_WGMMA_SS_LO2(128, 64, "64", "65", "66", "67", "68", "69")
#undef XSK_WGMMA_SS_LO2
#undef XSK_WGMMA_SS_LO
#define XSK_WGMMA_RS_LO2(NN, NREG, ...)                   \
  XSK_WGMMA_RS_LO(__half, "f16", NN, NREG, __VA_ARGS__) \
  XSK_WGMMA_RS_LO(__nv_bfloat16, "bf16", NN, NREG, __VA_ARGS__)
XSK_WGMMA_RS_LO2(128, 64, "64", "65", "66", "67", "68", "69", "70")
XSK_WGMMA_RS_LO2(64, 32, "32", "33", "34", "35", "36", "37", "38")
#undef XSK_WGMMA_RS_LO2
#undef XSK_WGMMA_RS_LO

XSK_WGMMA_SS_N64(__half, "f16")
XSK_WGMMA_SS_N64(__nv_bfloat16, "bf16")
XSK_WGMMA_RS_N128(__half, "f16")
XSK_WGMMA_RS_N128(__nv_bfloat16, "bf16")
XSK_WGMMA_RS_N64(__half, "f16")
XSK_WGMMA_RS_N64(__nv_bfloat16, "bf16")
#undef XSK_WGMMA_SS_N64
#undef XSK_WGMMA_RS_N128
#undef XSK_WGMMA_RS_N64
#undef XSK_WGMMA_D64_REGS
#undef XSK_WGMMA_D64_OPS
#undef XSK_WGMMA_D32_REGS
#undef XSK_WGMMA_D32_OPS
}  // namespace sm90
}  // namespace xsk
