// Plain parameter structs shared by the torch glue (csrc/api) and the kernels.
// No torch headers here: the .cu files include only CUDA.
#pragma once
#include <cstdint>

namespace xsk {

// Per-query search of the selection stage (see xformers_sparsek/_selection.py for the
// algorithm; the tables are built there, in PyTorch).
struct SelectParams {
  // Wavelet matrix over the head-major score ranks (N = S * NK elements).
  const int* zeros;      // [L, N + 1]: zero bits among the first p elements of each level
  const double* wsum;    // [L, N + 1]: score sum of those
  const int* nzeros;     // [L]
  int nbits, N;
  // Per head: breakpoints of f(t) = sum clip(u - t, 0, 1) and the rank thresholds at the
  // midpoint of each piece.
  const double* cb;      // [S, NB], NB = 2 * NK
  const int* th_mid;     // [S, NB - 1]  global rank threshold of "u <= mid"
  const int* th_mid1;    // [S, NB - 1]  ... of "u <= mid + 1"
  const double* sv;      // [S, NK] sorted scores
  const int* perm;       // [S, NK] key index of each sorted position
  const int64_t* pool_lo;  // [NQ]
  const int64_t* win_lo;   // [NQ]
  int S, NQ, NK, topk;
  // Outputs [S, NQ]
  double* tau;
  double* ub;
  int64_t* jb;
  int64_t* nF;
  int64_t* rb;  // global rank of the boundary key, -1 when the whole pool is selected
};

// Per (query tile, head): the pool keys any query of the tile may select.
struct ListParams {
  const int* perm;          // [S * NK] key index of each head-major global rank
  const int64_t* rb;        // [S, NQ]
  const int64_t* pool_lo;   // [NQ]
  const int64_t* win_lo;    // [NQ]
  const int* tile_q0;       // [ntiles] first query of the tile
  const int* tile_q1;       // [ntiles] one past the last
  int S, NQ, NK, ntiles, cap;
  int* lists;     // [S, ntiles, cap]
  int* counts;    // [S, ntiles]
  int* overflow;  // set to 1 when a tile needs more than cap keys
};

// Attention forward over gathered key tiles.
struct FwdParams {
  const void* q;  // [NQ, S, R, D], last dim contiguous
  const void* k;  // [NK, S, R, D]
  const void* v;  // [NK, S, R, D]
  void* o;        // [NQ, S, R, D]
  int64_t q_sn, q_ss, q_sr, k_sn, k_ss, k_sr, v_sn, v_ss, v_sr, o_sn, o_ss, o_sr;
  float* lse;          // [S, R, NQ]
  const float* u;      // [S, NK] scores; nullptr = exact mode
  const double* tau;   // [S, NQ]
  const double* ub;    // [S, NQ]
  const int64_t* jb;   // [S, NQ]
  const int64_t* pool_lo;
  const int64_t* win_lo;
  const int64_t* win_hi;
  const int* tile_q0;
  const int* tile_q1;
  const int* lists;    // [S, ntiles, cap]
  const int* counts;   // [S, ntiles]
  int cap;
  int S, R, RP, NQ, NK, ntiles;
  float scale_log2;    // scale * log2(e)
};

}  // namespace xsk
