// Plain parameter structs shared by the torch glue (csrc/api) and the kernels.
// No torch headers here: the .cu files include only CUDA.
#pragma once
#include <cstdint>

namespace xsk {

// Per-query search of the selection stage (see xformers_sparsek/_selection.py for the
// algorithm; the tables are built there, in PyTorch).
struct SelectParams {
  // One wavelet matrix per head over the key ranks (ranks order keys by (score, index)).
  const int* zeros;      // [S, L, NK + 1]: zero bits among the first p elements of a level
  const double* wsum;    // [S, L, NK + 1]: score sum of those
  const int* nzeros;     // [S, L]
  int nbits;             // L
  // Per head: breakpoints of f(t) = sum clip(u - t, 0, 1) and the rank thresholds at the
  // midpoint of each piece.
  const double* cb;      // [S, 2 NK]
  const int* th_mid;     // [S, 2 NK - 1]  rank threshold of "u <= mid"
  const int* th_mid1;    // [S, 2 NK - 1]  ... of "u <= mid + 1"
  const double* sv;      // [S, NK] sorted scores
  const int* perm;       // [S, NK] key index of each rank
  const int64_t* pool_lo;  // [NQ]
  const int64_t* win_lo;   // [NQ]
  int S, NQ, NK, topk;
  // Two passes: pass 0 solves every 32nd query (and the last) with a full search and
  // records its piece; pass 1 searches the others between their neighbours' pieces.
  int* piece;            // [S, NQ] scratch
  // Outputs [S, NQ]
  double* tau;
  double* ub;
  int64_t* jb;
  int64_t* nF;
  int64_t* rb;  // rank of the boundary key in its head, -1 when the whole pool is selected
};

// Per (query tile, head): the pool keys any query of the tile may select.
struct ListParams {
  const int* perm;          // [S, NK] key index of each rank
  const int* ranks;         // [S, NK] rank of each key (perm's inverse)
  const int64_t* rb;        // [S, NQ] boundary rank (-1: whole pool selected)
  const int64_t* pool_lo;   // [NQ]
  const int64_t* win_lo;    // [NQ]
  const int* tile_q0;       // [ntiles] first query of the tile
  const int* tile_q1;       // [ntiles] one past the last
  int S, NQ, NK, ntiles, cap;
  int* lists;     // [S, ntiles, cap]
  int* counts;    // [S, ntiles]
  int* overflow;  // set to 1 when a tile needs more than cap keys
};

// A CUtensorMap (the TMA's description of a global tensor), opaque here so that this header
// needs no driver API; filled on the host by sm90/key_tma.h.
struct alignas(64) TmaDesc {
  uint64_t opaque[16];
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
  const int64_t* rb;   // [S, NQ] boundary rank (-1: whole pool selected)
  const int* ranks;    // [S, NK] rank of each key in its head (order by (score, index))
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
  // The Hopper kernels' TMA maps of K and V ([NK, S, R, D] as 4-D boxes of 64 columns x 32
  // keys), set by sm90/key_tma.h where the driver encodes them; tma_keys = 0: cp.async only.
  TmaDesc tma_k, tma_v;
  int tma_keys;
};

// Backward, pass 1 (query-centric, like the forward): dQ and, per row, the sum G of
// dL/dm over the row's selected fractional keys (for the score gradient's "mean" term).
struct BwdDqParams {
  FwdParams f;            // q, k, v, tiling, selection, lists (o: unused)
  const void* dout;       // [NQ, S, R, D]
  int64_t do_sn, do_ss, do_sr;
  const float* lse;       // [S, R, NQ] natural-log lse from the forward
  const float* delta;     // [S, R, NQ] rowsum(dout * out)
  void* dq;               // [NQ, S, R, D] (q's dtype)
  int64_t dq_sn, dq_ss, dq_sr;
  float* grow;            // [S, R, NQ] G per row (sparse mode)
  float scale;
  // TMA maps of q and dout in boxes of 64 rows, for the Hopper passes (sm90/key_tma.h);
  // tma_rows = 0: cp.async only
  TmaDesc tma_q, tma_do;
  int tma_rows;
};

// Backward, pass 2 (key-centric per super-tile of queries): partial dK, dV and direct
// score gradient of every key the super-tile attends, written to slot (super-tile, slot).
struct BwdDkvParams {
  BwdDqParams b;          // same inputs; b.f.tile_q0/q1, lists, counts describe super-tiles
  float* part_kv;         // [S * RG, ntiles, slots, 2, D] (dK then dV)
  float* part_u;          // [S * RG, ntiles, slots]
  int slots;              // per super-tile: pad64(cap) + pad64(max window span)
  int list_slots;         // pad64(cap): where the window stream's slots start
};

// One single-token decode step of SparseKCache (decode.cu). Shapes: B sequences, G KV
// heads, R query heads per KV head, window W, top set K, pool-score array N = K + capacity.
struct DecodeParams {
  // the step's inputs
  const void* q;        // [B, G, R, D] (K/V dtype)
  const void* k_new;    // [B, G, D]
  const void* v_new;    // [B, G, D]
  const double* u_new;  // [B, G] scores of the new tokens
  const bool* valid;    // [B] or nullptr (every row appends)
  // the cache's state, updated in place
  void* kv_k;           // [B, G, W + K, D]: ring (slot = pos % W), then the top set
  void* kv_v;
  double* win_u;        // [B, G, W]
  double* top_u;        // [B, G, K]
  int64_t* top_pos;     // [B, G, K]
  double* pool_u;       // [B, G, N] ascending, -inf padding first
  double* tau;          // [B, G]
  double* tau_min;      // [B, G]
  int64_t* overflow;    // [B, G]
  const int64_t* lens;  // [B] tokens seen before the step
  int64_t* lens_next;   // [B] after it (copied into lens by the caller)
  // split-K attention scratch and the output
  float* part_o;        // [B, G, splits, R, D]
  float* part_m;        // [B, G, splits, R]
  float* part_l;        // [B, G, splits, R]
  void* out;            // [B, G, R, D] (K/V dtype)
  int B, G, R, W, K, N;
  int k_row_bytes, v_row_bytes;
  int splits, slots_per_split;
  float scale;
};

}  // namespace xsk
