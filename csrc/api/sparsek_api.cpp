// Torch glue for the SparseK CUDA kernels: argument checks, allocation, stream, launch.
// The algorithms are documented in the kernels (csrc/sparsek/) and in
// xformers_sparsek/_cuda.py, which prepares the inputs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

#include "sparsek/launch.h"

#ifndef XSK_ARCHS  // set by setup.py from the -gencode list, e.g. "80;90a"
#define XSK_ARCHS "unknown"
#endif

namespace {

#define CHECK_CUDA_OK(expr)                                                       \
  do {                                                                            \
    cudaError_t err_ = (expr);                                                    \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_)); \
  } while (0)

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

py::dict build_info() {
  py::dict d;
  d["cuda_version"] = std::to_string(CUDART_VERSION);
  py::list archs;
  std::string s = XSK_ARCHS;
  for (size_t start = 0; start <= s.size();) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) archs.append(s.substr(start, end - start));
    start = end + 1;
  }
  d["archs"] = archs;
  return d;
}

// Per-row wavelet matrices over ranks [rows, n] (int32) with weights [rows, n] (float64):
// returns (zeros int32 [rows, L, n + 1], wsum float64 [rows, L, n + 1], nzeros int32 [rows, L]).
std::vector<at::Tensor> wavelet_build(const at::Tensor& ranks, const at::Tensor& weights) {
  check(ranks, "ranks", at::kInt);
  check(weights, "weights", at::kDouble);
  TORCH_CHECK(ranks.dim() == 2 && weights.sizes() == ranks.sizes(), "ranks/weights: [rows, n]");
  const at::cuda::OptionalCUDAGuard guard(ranks.device());
  const int rows = ranks.size(0), n = ranks.size(1);
  int nbits = 1;
  while ((1LL << nbits) <= n) ++nbits;  // == n.bit_length() for n >= 1
  at::Tensor r = ranks.clone(), w = weights.clone();
  at::Tensor r_tmp = at::empty_like(r), w_tmp = at::empty_like(w);
  const int nchunks = (n + 2047) / 2048;
  // status per chunk, a done counter per (row, level), the ticket (wavelet_build.cu)
  at::Tensor sync = at::empty({(int64_t)rows * nchunks + (int64_t)rows * nbits + 1}, ranks.options());
  at::Tensor chunk_w = at::empty({rows, nchunks}, weights.options());
  at::Tensor zeros = at::empty({rows, nbits, n + 1}, ranks.options());
  at::Tensor wsum = at::empty({rows, nbits, n + 1}, weights.options());
  at::Tensor nzeros = at::empty({rows, nbits}, ranks.options());
  CHECK_CUDA_OK(xsk::launch_wavelet_build(
      r.data_ptr<int>(), w.data_ptr<double>(), r_tmp.data_ptr<int>(), w_tmp.data_ptr<double>(),
      rows, n, nbits, sync.data_ptr<int>(), chunk_w.data_ptr<double>(), zeros.data_ptr<int>(),
      wsum.data_ptr<double>(), nzeros.data_ptr<int>(), at::cuda::getCurrentCUDAStream()));
  return {zeros, wsum, nzeros};
}

// Per row and j: the weight sum over [lo[j], hi[j]) of the elements with th_lo <= rank < th_hi.
at::Tensor wavelet_range_sum(const at::Tensor& zeros, const at::Tensor& wsum,
                             const at::Tensor& nzeros, const at::Tensor& lo, const at::Tensor& hi,
                             const at::Tensor& th_lo, const at::Tensor& th_hi) {
  check(zeros, "zeros", at::kInt);
  check(wsum, "wsum", at::kDouble);
  check(nzeros, "nzeros", at::kInt);
  check(lo, "lo", at::kInt);
  check(hi, "hi", at::kInt);
  check(th_lo, "th_lo", at::kInt);
  check(th_hi, "th_hi", at::kInt);
  TORCH_CHECK(zeros.dim() == 3 && wsum.sizes() == zeros.sizes(), "zeros / wsum: [rows, L, n + 1]");
  const int rows = zeros.size(0), nbits = zeros.size(1), n = zeros.size(2) - 1, m = lo.numel();
  TORCH_CHECK(hi.numel() == m && th_lo.dim() == 2 && th_lo.size(0) == rows && th_lo.size(1) == m &&
                  th_hi.sizes() == th_lo.sizes(),
              "lo / hi: [m], th_lo / th_hi: [rows, m]");
  const at::cuda::OptionalCUDAGuard guard(zeros.device());
  at::Tensor out = at::empty({rows, m}, wsum.options());
  CHECK_CUDA_OK(xsk::launch_wavelet_range_sum(
      zeros.data_ptr<int>(), wsum.data_ptr<double>(), nzeros.data_ptr<int>(), rows, n, nbits, m,
      lo.data_ptr<int>(), hi.data_ptr<int>(), th_lo.data_ptr<int>(), th_hi.data_ptr<int>(),
      out.data_ptr<double>(), at::cuda::getCurrentCUDAStream()));
  return out;
}

// The scores as the selection reads them (scores.cu): (float32 [S, NK] contiguous with
// non-finite values replaced by 0, int32 [1] flag: 1 if any was non-finite).
std::vector<at::Tensor> scores_f32(const at::Tensor& scores) {
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 2, "scores_f32: scores must be a CUDA [S, NK]");
  TORCH_CHECK(scores.size(0) < (1LL << 31) && scores.size(1) < (1LL << 31),
              "scores_f32: too many heads/keys");
  const auto st = scores.scalar_type();
  const int dtype = st == at::kHalf ? 0 : st == at::kBFloat16 ? 1 : st == at::kFloat ? 2
                  : st == at::kDouble ? 3 : -1;
  TORCH_CHECK(dtype >= 0, "scores_f32: scores must be float16, bfloat16, float32 or float64");
  const at::cuda::OptionalCUDAGuard guard(scores.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  at::Tensor bad = at::zeros({1}, scores.options().dtype(at::kInt));
  CHECK_CUDA_OK(xsk::launch_scores_f32(scores.data_ptr(), dtype, scores.stride(0),
                                       scores.stride(1), (int)scores.size(0),
                                       (int)scores.size(1), out.data_ptr<float>(),
                                       bad.data_ptr<int>(), at::cuda::getCurrentCUDAStream()));
  return {out, bad};
}

// Stable sort of each row of u [rows, n] (float32): (values, int64 indices), the same as
// torch.sort(u, dim=1, stable=True) in two launches (row_sort.cu).
std::vector<at::Tensor> sort_rows(const at::Tensor& u) {
  check(u, "u", at::kFloat);
  TORCH_CHECK(u.dim() == 2, "sort_rows: u must be [rows, n]");
  TORCH_CHECK(u.size(1) < (1LL << 30), "sort_rows: rows of at most 2^30 elements");
  const at::cuda::OptionalCUDAGuard guard(u.device());
  const int64_t rows = u.size(0), n = u.size(1);
  at::Tensor vals = at::empty_like(u), idx = at::empty({rows, n}, u.options().dtype(at::kLong));
  at::Tensor scratch = at::empty({(int64_t)xsk::row_sort_scratch_ints((int)rows, (int)n)},
                                 u.options().dtype(at::kInt));
  CHECK_CUDA_OK(xsk::launch_row_sort(u.data_ptr<float>(), (int)rows, (int)n,
                                     scratch.data_ptr<int>(), vals.data_ptr<float>(),
                                     idx.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
  return {vals, idx};
}

// The selection tables from float32 scores u [S, NK] and their stable per-head sort (sv, perm):
// (u64, sv64, perm32, ranks32, cb [S, 2NK], th_mid, th_mid1 [S, 2NK - 1]); see select_tables.cu.
std::vector<at::Tensor> select_tables(const at::Tensor& u, const at::Tensor& sv,
                                      const at::Tensor& perm) {
  check(u, "u", at::kFloat);
  check(sv, "sv", at::kFloat);
  check(perm, "perm", at::kLong);
  TORCH_CHECK(u.dim() == 2 && sv.sizes() == u.sizes() && perm.sizes() == u.sizes(),
              "u / sv / perm: [S, NK]");
  TORCH_CHECK(u.size(0) < 65536 && u.size(1) < (1LL << 30), "select_tables: too many heads/keys");
  const at::cuda::OptionalCUDAGuard guard(u.device());
  const int64_t S = u.size(0), n = u.size(1);
  auto f64 = u.options().dtype(at::kDouble), i32 = u.options().dtype(at::kInt);
  at::Tensor u64 = at::empty({S, n}, f64), sv64 = at::empty({S, n}, f64);
  at::Tensor perm32 = at::empty({S, n}, i32), ranks32 = at::empty({S, n}, i32);
  at::Tensor cb = at::empty({S, 2 * n}, f64);
  at::Tensor th_mid = at::empty({S, std::max<int64_t>(2 * n - 1, 0)}, i32);
  at::Tensor th_mid1 = at::empty_like(th_mid);
  CHECK_CUDA_OK(xsk::launch_select_tables(
      u.data_ptr<float>(), sv.data_ptr<float>(), perm.data_ptr<int64_t>(), (int)S, (int)n,
      u64.data_ptr<double>(), sv64.data_ptr<double>(), perm32.data_ptr<int>(),
      ranks32.data_ptr<int>(), cb.data_ptr<double>(), th_mid.data_ptr<int>(),
      th_mid1.data_ptr<int>(), at::cuda::getCurrentCUDAStream()));
  return {u64, sv64, perm32, ranks32, cb, th_mid, th_mid1};
}

// Per-query tau, boundary and |F| from the selection tables.
std::vector<at::Tensor> select_queries(const at::Tensor& zeros, const at::Tensor& wsum,
                               const at::Tensor& nzeros, const at::Tensor& cb,
                               const at::Tensor& th_mid, const at::Tensor& th_mid1,
                               const at::Tensor& sv, const at::Tensor& perm,
                               const at::Tensor& pool_lo, const at::Tensor& win_lo, int64_t topk) {
  check(zeros, "zeros", at::kInt);
  check(wsum, "wsum", at::kDouble);
  check(nzeros, "nzeros", at::kInt);
  check(cb, "cb", at::kDouble);
  check(th_mid, "th_mid", at::kInt);
  check(th_mid1, "th_mid1", at::kInt);
  check(sv, "sv", at::kDouble);
  check(perm, "perm", at::kInt);
  check(pool_lo, "pool_lo", at::kLong);
  check(win_lo, "win_lo", at::kLong);
  const at::cuda::OptionalCUDAGuard guard(sv.device());
  const int S = sv.size(0), NK = sv.size(1), NQ = pool_lo.size(0);
  TORCH_CHECK(zeros.dim() == 3 && zeros.size(0) == S && zeros.size(2) == NK + 1,
              "zeros must be [S, L, NK + 1]");
  TORCH_CHECK(wsum.sizes() == zeros.sizes(), "wsum must match zeros");
  auto f64 = sv.options();
  auto i64 = pool_lo.options();
  at::Tensor tau = at::empty({S, NQ}, f64), ub = at::empty({S, NQ}, f64);
  at::Tensor jb = at::empty({S, NQ}, i64), nF = at::empty({S, NQ}, i64),
             rb = at::empty({S, NQ}, i64);
  at::Tensor piece = at::empty({S, NQ}, zeros.options());
  xsk::SelectParams p{};
  p.zeros = zeros.data_ptr<int>();
  p.wsum = wsum.data_ptr<double>();
  p.nzeros = nzeros.data_ptr<int>();
  p.nbits = zeros.size(1);
  p.piece = piece.data_ptr<int>();
  p.cb = cb.data_ptr<double>();
  p.th_mid = th_mid.data_ptr<int>();
  p.th_mid1 = th_mid1.data_ptr<int>();
  p.sv = sv.data_ptr<double>();
  p.perm = perm.data_ptr<int>();
  p.pool_lo = pool_lo.data_ptr<int64_t>();
  p.win_lo = win_lo.data_ptr<int64_t>();
  p.S = S;
  p.NQ = NQ;
  p.NK = NK;
  p.topk = topk;
  p.tau = tau.data_ptr<double>();
  p.ub = ub.data_ptr<double>();
  p.jb = jb.data_ptr<int64_t>();
  p.nF = nF.data_ptr<int64_t>();
  p.rb = rb.data_ptr<int64_t>();
  CHECK_CUDA_OK(xsk::launch_select(p, at::cuda::getCurrentCUDAStream()));
  return {tau, ub, jb, nF, rb};
}

// Key lists per (query tile, head), in lists.cu's order (perm walks the ranks downwards,
// ranks places the few keys outside every query's pool range); returns (lists, counts,
// overflow flag).
std::vector<at::Tensor> build_lists(const at::Tensor& perm, const at::Tensor& ranks,
                                    const at::Tensor& rb, const at::Tensor& pool_lo,
                                    const at::Tensor& win_lo,
                                    const at::Tensor& tile_q0, const at::Tensor& tile_q1,
                                    int64_t num_keys, int64_t cap) {
  check(perm, "perm", at::kInt);
  check(ranks, "ranks", at::kInt);
  TORCH_CHECK(ranks.sizes() == perm.sizes(), "ranks: the shape of perm");
  check(rb, "rb", at::kLong);
  check(pool_lo, "pool_lo", at::kLong);
  check(win_lo, "win_lo", at::kLong);
  check(tile_q0, "tile_q0", at::kInt);
  check(tile_q1, "tile_q1", at::kInt);
  const at::cuda::OptionalCUDAGuard guard(perm.device());
  const int S = rb.size(0), NQ = rb.size(1), ntiles = tile_q0.size(0);
  auto i32 = perm.options();
  at::Tensor lists = at::empty({S, ntiles, cap}, i32);
  at::Tensor counts = at::empty({S, ntiles}, i32);
  at::Tensor overflow = at::zeros({1}, i32);
  xsk::ListParams p{};
  p.perm = perm.data_ptr<int>();
  p.ranks = ranks.data_ptr<int>();
  p.rb = rb.data_ptr<int64_t>();
  p.pool_lo = pool_lo.data_ptr<int64_t>();
  p.win_lo = win_lo.data_ptr<int64_t>();
  p.tile_q0 = tile_q0.data_ptr<int>();
  p.tile_q1 = tile_q1.data_ptr<int>();
  p.S = S;
  p.NQ = NQ;
  p.NK = num_keys;
  p.ntiles = ntiles;
  p.cap = cap;
  p.lists = lists.data_ptr<int>();
  p.counts = counts.data_ptr<int>();
  p.overflow = overflow.data_ptr<int>();
  CHECK_CUDA_OK(xsk::launch_build_lists(p, at::cuda::getCurrentCUDAStream()));
  return {lists, counts, overflow};
}

// Fills the parameters shared by the forward and backward kernels.  q/k/v: [N, S, R, D]
// with a contiguous last dim; u == None: exact mode.
xsk::FwdParams fill_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& u, const at::Tensor& tau,
                           const at::Tensor& rb, const at::Tensor& ranks,
                           const at::Tensor& pool_lo, const at::Tensor& win_lo,
                           const at::Tensor& win_hi, const at::Tensor& tile_q0,
                           const at::Tensor& tile_q1, const at::Tensor& lists,
                           const at::Tensor& counts, int64_t rp, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [N, S, R, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q, k, v must be float16 or bfloat16");
  const int D = q.size(3);
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "head dims of q, k, v must match");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1, "q, k, v need a contiguous last dim");
    for (int d = 0; d < 3; ++d)
      TORCH_CHECK(t->stride(d) % 8 == 0, "q/k/v strides must be multiples of 8 elements");
  }
  // (the Hopper producers address key rows with 32-bit byte strides)
  TORCH_CHECK(k.stride(0) < (1LL << 31) && v.stride(0) < (1LL << 31),
              "k / v: key stride of 2^31 elements or more");
  const int R = q.size(2);
  TORCH_CHECK(R % rp == 0 && 128 % rp == 0, "rp must divide R and 128");
  xsk::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sn = q.stride(0); p.q_ss = q.stride(1); p.q_sr = q.stride(2);
  p.k_sn = k.stride(0); p.k_ss = k.stride(1); p.k_sr = k.stride(2);
  p.v_sn = v.stride(0); p.v_ss = v.stride(1); p.v_sr = v.stride(2);
  if (u.has_value()) {
    check(*u, "u", at::kFloat);
    check(tau, "tau", at::kDouble);
    check(rb, "rb", at::kLong);
    check(ranks, "ranks", at::kInt);
    check(lists, "lists", at::kInt);
    check(counts, "counts", at::kInt);
    p.u = u->data_ptr<float>();
    p.tau = tau.data_ptr<double>();
    p.rb = rb.data_ptr<int64_t>();
    p.ranks = ranks.data_ptr<int>();
    p.lists = lists.data_ptr<int>();
    p.counts = counts.data_ptr<int>();
    p.cap = lists.size(2);
  }
  check(pool_lo, "pool_lo", at::kLong);
  check(win_lo, "win_lo", at::kLong);
  check(win_hi, "win_hi", at::kLong);
  check(tile_q0, "tile_q0", at::kInt);
  check(tile_q1, "tile_q1", at::kInt);
  p.pool_lo = pool_lo.data_ptr<int64_t>();
  p.win_lo = win_lo.data_ptr<int64_t>();
  p.win_hi = win_hi.data_ptr<int64_t>();
  p.tile_q0 = tile_q0.data_ptr<int>();
  p.tile_q1 = tile_q1.data_ptr<int>();
  p.S = q.size(1);
  p.R = R;
  p.RP = rp;
  p.NQ = q.size(0);
  p.NK = k.size(0);
  p.ntiles = tile_q0.size(0);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

int dtype_code(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 ? 1 : 0; }

// Attention forward -> (out, lse [S, R, NQ] float32).
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& u, const at::Tensor& tau,
                            const at::Tensor& rb, const at::Tensor& ranks,
                            const at::Tensor& pool_lo, const at::Tensor& win_lo,
                            const at::Tensor& win_hi, const at::Tensor& tile_q0,
                            const at::Tensor& tile_q1, const at::Tensor& lists,
                            const at::Tensor& counts, int64_t rp, double scale) {
  const at::cuda::OptionalCUDAGuard guard(q.device());
  // The Hopper forward takes the row maxima of ungated tiles on raw scores and scales them
  // inside exp2, which needs scale > 0: a negative scale becomes q -> -q, scale -> -scale;
  // a zero scale makes every logit 0 (q -> 0, scale 1).
  at::Tensor q_pos = q;
  if (scale <= 0) {
    q_pos = scale < 0 ? q.neg() : at::zeros_like(q);
    scale = scale < 0 ? -scale : 1.0;
  }
  xsk::FwdParams p = fill_params(q_pos, k, v, u, tau, rb, ranks, pool_lo, win_lo, win_hi,
                                 tile_q0, tile_q1, lists, counts, rp, scale);
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.S, p.R, p.NQ}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.o_sn = o.stride(0); p.o_ss = o.stride(1); p.o_sr = o.stride(2);
  p.lse = lse.data_ptr<float>();
  CHECK_CUDA_OK(xsk::launch_fwd(p, dtype_code(q), q.size(3), at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

// Backward passes 1 and 2 (sparse mode).  The dq pass runs on the (tile_q0, tile_q1, lists,
// counts) tiling with rp packed heads (128-row tiles for the Hopper kernels, hopper = true;
// 64-row tiles otherwise), the dk/dv pass on the super-tiles (sup_q0, sup_q1, sup_lists,
// sup_counts) with rp_kv packed heads.
// Returns (dq, grow [S, R, NQ], part_kv [G, ntiles_sup, slots, 2, D], part_u [G, ntiles_sup, slots]).
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& u, const at::Tensor& tau,
                            const at::Tensor& rb, const at::Tensor& ranks,
                            const at::Tensor& pool_lo, const at::Tensor& win_lo,
                            const at::Tensor& win_hi, const at::Tensor& lse,
                            const at::Tensor& delta, const at::Tensor& tile_q0,
                            const at::Tensor& tile_q1, const at::Tensor& lists,
                            const at::Tensor& counts, const at::Tensor& sup_q0,
                            const at::Tensor& sup_q1, const at::Tensor& sup_lists,
                            const at::Tensor& sup_counts, int64_t rp, int64_t rp_kv,
                            double scale, int64_t slots, int64_t list_slots, bool hopper) {
  const at::cuda::OptionalCUDAGuard guard(q.device());
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  dout.stride(3) == 1,
              "dout must match q");
  check(lse, "lse", at::kFloat);
  check(delta, "delta", at::kFloat);
  // (the Hopper dk/dv kernel maps rows to packed heads with shifts; rp divides 128 anyway)
  TORCH_CHECK(rp_kv > 0 && (rp_kv & (rp_kv - 1)) == 0, "rp_kv must be a power of two");
  xsk::BwdDqParams b{};
  b.f = fill_params(q, k, v, u, tau, rb, ranks, pool_lo, win_lo, win_hi, tile_q0, tile_q1, lists,
                    counts, rp, scale);
  b.dout = dout.data_ptr();
  b.do_sn = dout.stride(0); b.do_ss = dout.stride(1); b.do_sr = dout.stride(2);
  b.lse = lse.data_ptr<float>();
  b.delta = delta.data_ptr<float>();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  b.dq = dq.data_ptr();
  b.dq_sn = dq.stride(0); b.dq_ss = dq.stride(1); b.dq_sr = dq.stride(2);
  at::Tensor grow = at::empty({b.f.S, b.f.R, b.f.NQ}, q.options().dtype(at::kFloat));
  b.grow = grow.data_ptr<float>();
  b.scale = static_cast<float>(scale);

  xsk::BwdDkvParams kp{};
  kp.b = b;
  kp.b.f = fill_params(q, k, v, u, tau, rb, ranks, pool_lo, win_lo, win_hi, sup_q0, sup_q1,
                       sup_lists, sup_counts, rp_kv, scale);
  const int groups = b.f.S * (b.f.R / rp_kv), nsup = sup_q0.size(0), D = q.size(3);
  at::Tensor part_kv = at::empty({groups, nsup, slots, 2, D}, q.options().dtype(at::kFloat));
  at::Tensor part_u = at::empty({groups, nsup, slots}, q.options().dtype(at::kFloat));
  kp.part_kv = part_kv.data_ptr<float>();
  kp.part_u = part_u.data_ptr<float>();
  kp.slots = slots;
  kp.list_slots = list_slots;
  TORCH_CHECK(!hopper || xsk::use_sm90("XFORMERS_SPARSEK_BWD"),
              "the Hopper backward kernels are not available here");
  CHECK_CUDA_OK(
      xsk::launch_bwd(b, kp, dtype_code(q), D, hopper, at::cuda::getCurrentCUDAStream()));
  return {dq, grow, part_kv, part_u};
}

// Pass 0: delta [S, R, NQ] = rowsum(dout * out) in fp32 (dout, out: [NQ, S, R, D], last dim
// contiguous, fp16 / bf16, D = 64 / 128: the kernels' inputs).
at::Tensor bwd_delta(const at::Tensor& dout, const at::Tensor& out) {
  TORCH_CHECK(dout.is_cuda() && out.is_cuda(), "dout / out must be CUDA tensors");
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == out.sizes(), "dout / out: [NQ, S, R, D]");
  TORCH_CHECK(dout.scalar_type() == out.scalar_type() &&
                  (dout.scalar_type() == at::kHalf || dout.scalar_type() == at::kBFloat16),
              "dout / out must be fp16 or bf16 of one dtype");
  TORCH_CHECK(dout.stride(3) == 1 && out.stride(3) == 1, "dout / out: last dim contiguous");
  const at::cuda::OptionalCUDAGuard guard(dout.device());
  const int NQ = dout.size(0), S = dout.size(1), R = dout.size(2), D = dout.size(3);
  for (const at::Tensor* t : {&dout, &out})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) % 8 == 0 &&
                    t->stride(1) % 8 == 0 && t->stride(2) % 8 == 0,
                "dout / out rows must be 16-byte aligned");
  at::Tensor delta = at::empty({S, R, NQ}, dout.options().dtype(at::kFloat));
  CHECK_CUDA_OK(xsk::launch_bwd_delta(dout.data_ptr(), out.data_ptr(), dtype_code(dout), D, NQ, S,
                                      R, dout.stride(0), dout.stride(1), dout.stride(2),
                                      out.stride(0), out.stride(1), out.stride(2),
                                      delta.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return delta;
}

// Pass 3: per (group, key) sums of the partial slots, written into dk, dv [NK, S, R, D] (q's
// dtype; group g = (s, rgroup) on head rgroup * heads_per_group, zeros on the group's other
// heads); returns du [G, NK] (fp32).
at::Tensor bwd_reduce(const at::Tensor& part_kv, const at::Tensor& part_u,
                                   const at::Tensor& off, const at::Tensor& order,
                                   int64_t groups_per_head, int64_t heads_per_group,
                                   const at::Tensor& dk, const at::Tensor& dv) {
  check(part_kv, "part_kv", at::kFloat);
  check(part_u, "part_u", at::kFloat);
  check(off, "off", at::kLong);
  check(order, "order", at::kLong);
  const at::cuda::OptionalCUDAGuard guard(part_kv.device());
  const int groups = part_kv.size(0), D = part_kv.size(4);
  const int64_t group_slots = part_kv.size(1) * part_kv.size(2);
  TORCH_CHECK(dk.is_cuda() && dk.dim() == 4 && dk.sizes() == dv.sizes() &&
                  dk.strides() == dv.strides() && dk.scalar_type() == dv.scalar_type() &&
                  (dk.scalar_type() == at::kHalf || dk.scalar_type() == at::kBFloat16) &&
                  dk.size(3) == D && dk.stride(3) == 1,
              "dk / dv: [NK, S, R, D] 16-bit, last dim contiguous");
  const int64_t NK = dk.size(0);
  TORCH_CHECK(heads_per_group >= 1 && groups_per_head >= 1 &&
                  dk.size(2) == groups_per_head * heads_per_group &&
                  dk.size(1) * groups_per_head == groups,
              "dk / dv heads do not match the groups of part_kv");
  at::Tensor du = at::empty({groups, NK}, part_kv.options());
  CHECK_CUDA_OK(xsk::launch_bwd_reduce(
      part_kv.data_ptr<float>(), part_u.data_ptr<float>(), off.data_ptr<int64_t>(),
      order.data_ptr<int64_t>(), groups, groups_per_head, heads_per_group, NK, D, group_slots,
      dtype_code(dk), dk.data_ptr(), dv.data_ptr(), dk.stride(0), dk.stride(1), dk.stride(2),
      du.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return du;
}

}  // namespace

// Largest pool-score array (topk + capacity) the fused decode step handles on this device:
// its update kernel keeps two copies of it in shared memory.
int64_t decode_max_pool_slots(int64_t head_dim) {
  int dev = 0, optin = 0;
  CHECK_CUDA_OK(cudaGetDevice(&dev));
  CHECK_CUDA_OK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int row = static_cast<int>(head_dim) * 2;
  int64_t n = 0;
  while (xsk::decode_update_smem_bytes(static_cast<int>(n + 1024), row, row) <= (size_t)optin) n += 1024;
  return n;
}

// One fused SparseKCache decode step (csrc/sparsek/decode.cu): updates the state tensors in
// place (lens too) and returns out [B, G, R, D] in the K/V dtype.
at::Tensor decode_step(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& u_new, const c10::optional<at::Tensor>& valid,
                       const at::Tensor& kv_k, const at::Tensor& kv_v, const at::Tensor& win_u,
                       const at::Tensor& top_u, const at::Tensor& top_pos,
                       const at::Tensor& pool_u, const at::Tensor& tau, const at::Tensor& tau_min,
                       const at::Tensor& overflow, const at::Tensor& lens, int64_t window,
                       double scale) {
  const auto dt = kv_k.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "kv_k must be float16 or bfloat16");
  check(kv_k, "kv_k", dt);
  check(kv_v, "kv_v", dt);
  check(q, "q", dt);
  check(k_new, "k_new", dt);
  check(v_new, "v_new", dt);
  check(u_new, "u_new", at::kDouble);
  check(win_u, "win_u", at::kDouble);
  check(top_u, "top_u", at::kDouble);
  check(top_pos, "top_pos", at::kLong);
  check(pool_u, "pool_u", at::kDouble);
  check(tau, "tau", at::kDouble);
  check(tau_min, "tau_min", at::kDouble);
  check(overflow, "overflow", at::kLong);
  check(lens, "lens", at::kLong);
  if (valid) check(*valid, "valid", at::kBool);
  TORCH_CHECK(kv_k.dim() == 4 && q.dim() == 4, "kv_k must be [B, G, W + K, D], q [B, G, R, D]");
  const int B = kv_k.size(0), G = kv_k.size(1), S = kv_k.size(2), D = kv_k.size(3);
  const int W = static_cast<int>(window), K = S - W, R = q.size(2);
  TORCH_CHECK(kv_v.sizes() == kv_k.sizes(), "kv_v must match kv_k (value_dim == head_dim)");
  TORCH_CHECK(q.size(0) == B && q.size(1) == G && q.size(3) == D, "q must be [B, G, R, D]");
  TORCH_CHECK(k_new.numel() == (int64_t)B * G * D && v_new.numel() == k_new.numel(),
              "k_new / v_new must be [B, G, D]");
  TORCH_CHECK(W >= 0 && K >= 1, "window must be in [0, W + K)");
  TORCH_CHECK(top_u.numel() == (int64_t)B * G * K && pool_u.size(-1) >= K, "top set / pool shapes");
  const at::cuda::OptionalCUDAGuard guard(kv_k.device());
  xsk::DecodeParams p{};
  p.B = B, p.G = G, p.R = R, p.W = W, p.K = K, p.N = pool_u.size(-1);
  p.k_row_bytes = p.v_row_bytes = D * 2;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  p.slots_per_split = xsk::decode_attend_slots_per_split(
      B * G, S, D, prop->multiProcessorCount, prop->sharedMemPerMultiprocessor);
  p.splits = (S + p.slots_per_split - 1) / p.slots_per_split;
  p.scale = static_cast<float>(scale);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({B, G, p.splits, R, D}, f32);
  at::Tensor part_m = at::empty({B, G, p.splits, R}, f32);
  at::Tensor part_l = at::empty({B, G, p.splits, R}, f32);
  at::Tensor lens_next = at::empty_like(lens);
  at::Tensor out = at::empty({B, G, R, D}, q.options());
  p.q = q.data_ptr(), p.k_new = k_new.data_ptr(), p.v_new = v_new.data_ptr();
  p.u_new = u_new.data_ptr<double>();
  p.valid = valid ? valid->data_ptr<bool>() : nullptr;
  p.kv_k = kv_k.data_ptr(), p.kv_v = kv_v.data_ptr();
  p.win_u = win_u.data_ptr<double>(), p.top_u = top_u.data_ptr<double>();
  p.top_pos = top_pos.data_ptr<int64_t>(), p.pool_u = pool_u.data_ptr<double>();
  p.tau = tau.data_ptr<double>(), p.tau_min = tau_min.data_ptr<double>();
  p.overflow = overflow.data_ptr<int64_t>();
  p.lens = lens.data_ptr<int64_t>(), p.lens_next = lens_next.data_ptr<int64_t>();
  p.part_o = part_o.data_ptr<float>(), p.part_m = part_m.data_ptr<float>();
  p.part_l = part_l.data_ptr<float>();
  p.out = out.data_ptr();
  CHECK_CUDA_OK(xsk::launch_decode(p, dt == at::kBFloat16 ? 1 : 0, D, at::cuda::getCurrentCUDAStream()));
  lens.copy_(lens_next);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xformers_sparsek CUDA kernels";
  m.def("build_info", &build_info, "CUDA runtime version and compiled archs");
  m.def("wavelet_build", &wavelet_build, "per-row wavelet matrices over ranks");
  m.def("wavelet_range_sum", &wavelet_range_sum,
        "per row: weight sums over index ranges between two rank thresholds");
  m.def("scores_f32", &scores_f32, "scores as float32 [S, NK], non-finite ones zeroed and flagged");
  m.def("sort_rows", &sort_rows, "stable per-row sort of float32 rows (torch.sort's result)");
  m.def("select_tables", &select_tables, "SparseK selection tables after the per-head sort");
  m.def("select_queries", &select_queries, "SparseK selection: per-query tau, top-k boundary, |F|");
  m.def("build_lists", &build_lists, "gathered pool-key list per (query tile, head)");
  m.def("fwd", &fwd, "SparseK attention forward");
  m.def("bwd", &bwd, "SparseK attention backward, passes 1 (dq) and 2 (dk/dv partials)");
  m.def("hopper_backward", [] { return xsk::use_sm90("XFORMERS_SPARSEK_BWD"); },
        "whether bwd's Hopper kernels run here (then pass 1 takes 128-row tiles)");
  m.def("decode_step", &decode_step, "one fused SparseKCache decode step (state in place)");
  m.def("decode_max_pool_slots", &decode_max_pool_slots,
        "largest topk + capacity the fused decode step handles on the current device");
  m.def("decode_max_rows", &xsk::decode_max_rows, "query heads per KV head of the fused decode step");
  m.def("bwd_delta", &bwd_delta, "SparseK backward pass 0: rowsum(dout * out) in fp32");
  m.def("bwd_reduce", &bwd_reduce, "SparseK backward pass 3: ordered sums of the partials");
}
