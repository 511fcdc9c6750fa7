// moeserve's native CPU kernels as torch operators: torch.ops.moeserve.<name>.
//
// Each op checks its arguments with TORCH_CHECK (a RuntimeError naming the op and the argument, never a crash
// or a read outside a tensor), allocates its outputs with at::detail::empty_cpu (no second dispatch, and a
// lighter header than ATen/ops/empty.h), takes the thread count from at::get_num_threads() and builds the
// kernels' structs (mk_mat_t, mk_moe_t) on its own stack: no state is kept between calls, so any number of
// threads may call any op at once (the C kernels' scratch buffers are thread-local).
//
// Weights are the GGUF byte tensors as stored (PackedTensor.data): uint8, contiguous, [N, row_bytes] or
// expert stacks [E, N, row_bytes], with the GGML type id as `qtype` and the logical row length k.
// The schemas are device-neutral: a CUDA build can register the same names with TORCH_LIBRARY_IMPL.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;

// Bytes per row of k weights for the GGML types the kernels read (0: not a native type).
int64_t row_bytes_of(int64_t qtype, int64_t k) {
  switch (qtype) {
    case 2: return k / 32 * 18;    // Q4_0
    case 3: return k / 32 * 20;    // Q4_1
    case 6: return k / 32 * 22;    // Q5_0
    case 7: return k / 32 * 24;    // Q5_1
    case 8: return k / 32 * 34;    // Q8_0
    case 10: return k / 256 * 84;  // Q2_K
    case 11: return k / 256 * 110; // Q3_K
    case 12: return k / 256 * 144; // Q4_K
    case 13: return k / 256 * 176; // Q5_K
    case 14: return k / 256 * 210; // Q6_K
    case 20: return k / 32 * 18;   // IQ4_NL
    case 23: return k / 256 * 136; // IQ4_XS
    default: return 0;
  }
}

int threads() { return at::get_num_threads(); }

Tensor empty(at::IntArrayRef size, at::ScalarType dtype = at::kFloat) { return at::detail::empty_cpu(size, dtype); }

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "moeserve::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "moeserve::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "moeserve::", op, ": ", name, " must be contiguous");
}

void check_f32(const Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "moeserve::", op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(dim < 0 || t.dim() == dim, "moeserve::", op, ": ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

void check_i64(const Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "moeserve::", op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "moeserve::", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

// A GGUF weight (2-D [N, row_bytes] or 3-D [E, N, row_bytes]) of `qtype` with rows of k weights.
void check_weight(const Tensor& w, int64_t qtype, int64_t k, const char* op, const char* name) {
  check_cpu(w, op, name);
  TORCH_CHECK(w.scalar_type() == at::kByte, "moeserve::", op, ": ", name, " must be the uint8 GGUF bytes, got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 2 || w.dim() == 3, "moeserve::", op, ": ", name, " must be 2-D or 3-D, got shape ",
              w.sizes());
  const int64_t rb = row_bytes_of(qtype, k);
  TORCH_CHECK(rb > 0, "moeserve::", op, ": ", name, " has GGML type ", qtype,
              ", which has no native kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,"
              " IQ4_XS)");
  TORCH_CHECK(k > 0 && k % 256 == 0, "moeserve::", op, ": the row length k must be a positive multiple of 256, got ",
              k);
  TORCH_CHECK(w.size(-1) == rb, "moeserve::", op, ": ", name, " rows are ", w.size(-1), " bytes, expected ", rb,
              " for GGML type ", qtype, " and k = ", k);
}

// x [m, k] float32 for a weight with rows of k
void check_input(const Tensor& x, int64_t k, const char* op) {
  check_f32(x, op, "x", 2);
  TORCH_CHECK(x.size(1) == k, "moeserve::", op, ": x has ", x.size(1), " columns, the weight rows ", k);
}

// every position in [0, cos.size(0)), cos/sin float32 [P, rope_dim / 2]
void check_rope(const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t T, int64_t hd,
                int64_t rope_dim, const char* op) {
  check_i64(positions, op, "positions", 1);
  TORCH_CHECK(positions.size(0) == T, "moeserve::", op, ": ", positions.size(0), " positions for ", T, " rows");
  check_f32(cos, op, "cos", 2);
  check_f32(sin, op, "sin", 2);
  TORCH_CHECK(rope_dim >= 0 && rope_dim % 2 == 0 && rope_dim <= hd, "moeserve::", op,
              ": rope_dim must be even and at most head_dim (", hd, "), got ", rope_dim);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) == rope_dim / 2, "moeserve::", op,
              ": cos and sin must both be [max_pos, rope_dim / 2 = ", rope_dim / 2, "], got ", cos.sizes(), " and ",
              sin.sizes());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t n = cos.size(0);
  for (int64_t t = 0; t < T; t++)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < n, "moeserve::", op, ": position ", pos[t],
                " is outside the RoPE tables (", n, " positions)");
}

void check_norm(const std::optional<Tensor>& w, int64_t hd, const char* op, const char* name) {
  if (!w.has_value()) return;
  check_f32(*w, op, name, 1);
  TORCH_CHECK(w->size(0) == hd, "moeserve::", op, ": ", name, " has ", w->size(0), " weights for head_dim ", hd);
}

const float* opt_ptr(const std::optional<Tensor>& w) { return w.has_value() ? w->data_ptr<float>() : nullptr; }

// y = x @ W.T (W = w, or expert `expert` of a 3-D stack): below min_gemm_rows rows the few-row integer kernel
// (mk_matmul), from there on mk_gemm.
Tensor qmatmul(const Tensor& x, const Tensor& w, int64_t qtype, int64_t k, int64_t min_gemm_rows,
               std::optional<int64_t> expert) {
  const char* op = "qmatmul";
  check_weight(w, qtype, k, op, "w");
  check_input(x, k, op);
  const uint8_t* base = w.data_ptr<uint8_t>();
  if (w.dim() == 3) {
    TORCH_CHECK(expert.has_value(), "moeserve::qmatmul: a 3-D expert stack needs an expert index");
    TORCH_CHECK(*expert >= 0 && *expert < w.size(0), "moeserve::qmatmul: expert ", *expert, " out of range [0, ",
                w.size(0), ")");
    base += *expert * w.stride(0);
  } else {
    TORCH_CHECK(!expert.has_value(), "moeserve::qmatmul: an expert index needs a 3-D expert stack");
  }
  const int64_t m = x.size(0), n = w.size(-2);
  Tensor y = empty({m, n});
  if (m == 0 || n == 0) return y;
  const int rc = (m >= min_gemm_rows ? mk_gemm : mk_matmul)(static_cast<int>(qtype), base, w.size(-1), n, k,
                                                            x.data_ptr<float>(), m, y.data_ptr<float>(), threads());
  TORCH_CHECK(rc == 0, "moeserve::qmatmul: the kernel failed (out of memory?)");
  return y;
}

// y = x @ W.T through one named GEMM ("auto": mk_gemm, "f32": mk_gemm_f32, "i16": mk_gemm_i16), whatever m.
Tensor qgemm(const Tensor& x, const Tensor& w, int64_t qtype, int64_t k, c10::string_view kind) {
  const char* op = "qgemm";
  check_weight(w, qtype, k, op, "w");
  check_input(x, k, op);
  TORCH_CHECK(w.dim() == 2, "moeserve::qgemm: w must be 2-D, got shape ", w.sizes());
  const bool i16 = (qtype >= 10 && qtype <= 14) || qtype == 23;  // Q2_K..Q6_K, IQ4_XS
  decltype(&mk_gemm) fn = mk_gemm;
  if (kind == "f32") {
    fn = mk_gemm_f32;
  } else if (kind == "i16") {
    TORCH_CHECK(i16, "moeserve::qgemm: the integer GEMM reads Q2_K..Q6_K and IQ4_XS only, got GGML type ",
                qtype);
    fn = mk_gemm_i16;
  } else {
    TORCH_CHECK(kind == "auto", "moeserve::qgemm: kind must be 'auto', 'f32' or 'i16', got '", std::string(kind),
                "'");
  }
  const int64_t m = x.size(0), n = w.size(0);
  Tensor y = empty({m, n});
  if (m == 0 || n == 0) return y;
  const int rc = fn(static_cast<int>(qtype), w.data_ptr<uint8_t>(), w.size(1), n, k, x.data_ptr<float>(), m,
                    y.data_ptr<float>(), threads());
  TORCH_CHECK(rc == 0, "moeserve::qgemm: the kernel failed (out of memory?)");
  return y;
}

// fills mats[j] for the 2-D weights ws[j] with outputs [m, N_j]; returns the outputs
std::vector<Tensor> bind_mats(const Tensor& x, at::TensorList ws, at::IntArrayRef qtypes, int64_t k, mk_mat_t* mats,
                              const char* op) {
  TORCH_CHECK(!ws.empty() && ws.size() <= 8, "moeserve::", op, ": 1 to 8 weights, got ", ws.size());
  TORCH_CHECK(qtypes.size() == ws.size(), "moeserve::", op, ": ", ws.size(), " weights but ", qtypes.size(),
              " qtypes");
  check_input(x, k, op);
  std::vector<Tensor> outs;
  outs.reserve(ws.size());
  for (size_t j = 0; j < ws.size(); j++) {
    const std::string name = "ws[" + std::to_string(j) + "]";
    check_weight(ws[j], qtypes[j], k, op, name.c_str());
    TORCH_CHECK(ws[j].dim() == 2, "moeserve::", op, ": ws[", j, "] must be 2-D, got shape ", ws[j].sizes());
    outs.push_back(empty({x.size(0), ws[j].size(0)}));
    mats[j] = mk_mat_t{static_cast<int32_t>(qtypes[j]), 0, ws[j].data_ptr<uint8_t>(), ws[j].size(1), ws[j].size(0),
                       outs[j].data_ptr<float>()};
  }
  return outs;
}

// (x @ W_1.T, x @ W_2.T, ...) for weights sharing their input, in one few-row integer call (x quantized once).
std::vector<Tensor> qmatmul_multi(const Tensor& x, at::TensorList ws, at::IntArrayRef qtypes, int64_t k) {
  mk_mat_t mats[8];
  std::vector<Tensor> outs = bind_mats(x, ws, qtypes, k, mats, "qmatmul_multi");
  const int rc = mk_matmul_multi(mats, static_cast<int64_t>(ws.size()), k, x.data_ptr<float>(), x.size(0), threads());
  TORCH_CHECK(rc == 0, "moeserve::qmatmul_multi: the kernel failed (out of memory?)");
  return outs;
}

// An attention layer's prologue at decode: q, k, v projections (ws = [Wq, Wk, Wv]), per-head RMSNorm of q and k
// (q_norm / k_norm, or none) and RoPE with the tables cos/sin [max_pos, rope_dim / 2] at `positions`.
std::tuple<Tensor, Tensor, Tensor> qkv_rope(const Tensor& x, at::TensorList ws, at::IntArrayRef qtypes,
                                            const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                                            const Tensor& positions, const Tensor& cos, const Tensor& sin,
                                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
                                            int64_t rope_dim, bool neox) {
  const char* op = "qkv_rope";
  TORCH_CHECK(ws.size() == 3, "moeserve::qkv_rope: ws must be [Wq, Wk, Wv], got ", ws.size(), " weights");
  TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && head_dim > 0, "moeserve::qkv_rope: head counts and head_dim must be "
              "positive");
  TORCH_CHECK(x.dim() == 2, "moeserve::qkv_rope: x must be 2-D, got shape ", x.sizes());
  mk_mat_t mats[3];
  std::vector<Tensor> outs = bind_mats(x, ws, qtypes, x.size(1), mats, op);
  const int64_t T = x.size(0);
  TORCH_CHECK(mats[0].N == n_heads * head_dim && mats[1].N == n_kv_heads * head_dim &&
                  mats[2].N == n_kv_heads * head_dim,
              "moeserve::qkv_rope: the weights have ", mats[0].N, ", ", mats[1].N, " and ", mats[2].N,
              " rows, expected ", n_heads * head_dim, ", ", n_kv_heads * head_dim, " and ", n_kv_heads * head_dim);
  check_norm(q_norm, head_dim, op, "q_norm");
  check_norm(k_norm, head_dim, op, "k_norm");
  check_rope(positions, cos, sin, T, head_dim, rope_dim, op);
  const int rc = mk_qkv_rope(mats, x.size(1), x.data_ptr<float>(), T, n_heads, n_kv_heads, head_dim, opt_ptr(q_norm),
                             opt_ptr(k_norm), static_cast<float>(eps), rope_dim, neox ? 1 : 0, cos.data_ptr<float>(),
                             sin.data_ptr<float>(), positions.data_ptr<int64_t>(), threads());
  TORCH_CHECK(rc == 0, "moeserve::qkv_rope: the kernel failed (out of memory?)");
  return {outs[0].view({T, n_heads, head_dim}), outs[1].view({T, n_kv_heads, head_dim}),
          outs[2].view({T, n_kv_heads, head_dim})};
}

// x [T, nh, hd] in place: per-head RMSNorm (weight, or none) then RoPE at `positions`.
Tensor norm_rope_(const Tensor& x, const std::optional<Tensor>& weight, const Tensor& positions, const Tensor& cos,
                  const Tensor& sin, double eps, int64_t rope_dim, bool neox) {
  const char* op = "norm_rope_";
  check_f32(x, op, "x", 3);
  check_norm(weight, x.size(2), op, "weight");
  check_rope(positions, cos, sin, x.size(0), x.size(2), rope_dim, op);
  const int rc = mk_norm_rope(x.data_ptr<float>(), x.size(0), x.size(1), x.size(2), opt_ptr(weight),
                              static_cast<float>(eps), rope_dim, neox ? 1 : 0, cos.data_ptr<float>(),
                              sin.data_ptr<float>(), positions.data_ptr<int64_t>());
  TORCH_CHECK(rc == 0, "moeserve::norm_rope_: the kernel rejected its inputs");
  return x;
}

// x * rsqrt(mean(x^2, -1) + eps) * weight (a new tensor)
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_f32(x, op, "x", -1);
  check_f32(weight, op, "weight", 1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(0), "moeserve::rms_norm: x has shape ", x.sizes(),
              ", weight ", weight.sizes());
  Tensor out = empty(x.sizes());
  const int64_t n = x.size(-1);
  if (x.numel() == 0) return out;
  mk_rms_norm(x.data_ptr<float>(), out.data_ptr<float>(), x.numel() / n, n, weight.data_ptr<float>(),
              static_cast<float>(eps));
  return out;
}

// raw [n, row_bytes] GGUF rows -> [n, k] float32, bit-exact with the reference dequantizer
Tensor dequant_rows(const Tensor& raw, int64_t qtype, int64_t k) {
  const char* op = "dequant_rows";
  check_weight(raw, qtype, k, op, "raw");
  TORCH_CHECK(raw.dim() == 2, "moeserve::dequant_rows: raw must be 2-D, got shape ", raw.sizes());
  const int64_t n = raw.size(0);
  Tensor out = empty({n, k}, at::kFloat);
  if (n == 0) return out;
  const int rc = mk_dequant(static_cast<int>(qtype), raw.data_ptr<uint8_t>(), raw.size(1), n, k,
                            out.data_ptr<float>(), threads());
  TORCH_CHECK(rc == 0, "moeserve::dequant_rows: the kernel rejected its inputs");
  return out;
}

// One query per sequence: q [B, nh, hd] against k/v [B, L, nkv, hd] (padded per sequence) or, with `table`
// [B, nb] int64 block ids and block_size, the paged pool [slots, nkv, hd]; lens [B] int64 -> [B, nh * hd].
// An empty tensor when the kernel declines (a length outside 1..Lmax, a block id outside the pool): the caller
// falls back.
Tensor attn_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lens,
                   const std::optional<Tensor>& table, int64_t block_size, int64_t window, double scale) {
  const char* op = "attn_decode";
  check_f32(q, op, "q", 3);
  const bool paged = table.has_value();
  check_f32(k, op, "k", paged ? 3 : 4);
  check_f32(v, op, "v", paged ? 3 : 4);
  check_i64(lens, op, "lens", 1);
  const int64_t B = q.size(0), nh = q.size(1), hd = q.size(2), nkv = k.size(-2);
  TORCH_CHECK(k.sizes() == v.sizes(), "moeserve::attn_decode: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(k.size(-1) == hd, "moeserve::attn_decode: k/v head_dim ", k.size(-1), ", q ", hd);
  TORCH_CHECK(hd % 8 == 0 && hd <= 256, "moeserve::attn_decode: head_dim must be a multiple of 8 up to 256, got ",
              hd);
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "moeserve::attn_decode: ", nh, " query heads for ", nkv, " KV heads");
  TORCH_CHECK(lens.size(0) == B, "moeserve::attn_decode: ", lens.size(0), " lengths for ", B, " queries");
  int64_t lmax, tstride = 0;
  const int64_t* tptr = nullptr;
  if (paged) {
    check_i64(*table, op, "table", 2);
    TORCH_CHECK(block_size >= 1, "moeserve::attn_decode: block_size must be >= 1 with a block table, got ",
                block_size);
    TORCH_CHECK(table->size(0) == B, "moeserve::attn_decode: the block table has ", table->size(0), " rows for ", B,
                " queries");
    tstride = table->size(1);
    lmax = tstride * block_size;
    tptr = table->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(k.size(0) == B, "moeserve::attn_decode: k has ", k.size(0), " sequences for ", B, " queries");
    lmax = k.size(1);
    block_size = 0;
  }
  Tensor out = empty({B, nh * hd});
  const int rc = mk_attn_decode(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), B, lmax,
                                lens.data_ptr<int64_t>(), nh, nkv, hd, static_cast<float>(scale), window, tptr,
                                tstride, block_size, k.size(0), out.data_ptr<float>(), threads());
  return rc == 0 ? out : empty({0});
}

// torch.argmax(x, -1) for x [R, V] float32 (first index on ties, first NaN if any)
Tensor argmax(const Tensor& x) {
  check_f32(x, "argmax", "x", 2);
  TORCH_CHECK(x.size(1) >= 1, "moeserve::argmax: x has no columns");
  Tensor out = empty({x.size(0)}, at::kLong);
  if (x.size(0) == 0) return out;
  mk_argmax(x.data_ptr<float>(), x.size(0), x.size(1), out.data_ptr<int64_t>(), threads());
  return out;
}

// the MoE layer's struct for x [T, H] and the gate/up [E, I, rb] and down [E, H, rb] stacks
mk_moe_t moe_layer(const Tensor& x, const Tensor& gate, const Tensor& up, const Tensor& down, at::IntArrayRef qtypes,
                   const char* op) {
  TORCH_CHECK(qtypes.size() == 3, "moeserve::", op, ": qtypes must be [gate, up, down], got ", qtypes.size());
  check_f32(x, op, "x", 2);
  const int64_t H = x.size(1);
  TORCH_CHECK(gate.dim() == 3 && up.dim() == 3 && down.dim() == 3, "moeserve::", op,
              ": gate, up and down must be 3-D expert stacks");
  const int64_t E = gate.size(0), I = gate.size(1);
  check_weight(gate, qtypes[0], H, op, "gate");
  check_weight(up, qtypes[1], H, op, "up");
  check_weight(down, qtypes[2], I, op, "down");
  TORCH_CHECK(E > 0 && up.size(0) == E && down.size(0) == E && up.size(1) == I && down.size(1) == H, "moeserve::", op,
              ": inconsistent expert stacks: gate ", gate.sizes(), ", up ", up.sizes(), ", down ", down.sizes(),
              " for hidden size ", H);
  mk_moe_t L{};
  const Tensor* ws[3] = {&gate, &up, &down};
  for (int i = 0; i < 3; i++) {
    L.qtype[i] = static_cast<int32_t>(qtypes[i]);
    L.base[i] = ws[i]->data_ptr<uint8_t>();
    L.expert_stride[i] = ws[i]->stride(0);
    L.row_bytes[i] = ws[i]->stride(1);
  }
  L.n_experts = E;
  L.H = H;
  L.I = I;
  return L;
}

// out [T, H] = Sum_j weights[t, j] * down_e(silu(gate_e(x)) * up_e(x)), e = experts[t, j]
Tensor moe(const Tensor& x, const Tensor& weights, const Tensor& experts, const Tensor& gate, const Tensor& up,
           const Tensor& down, at::IntArrayRef qtypes) {
  const char* op = "moe";
  const mk_moe_t L = moe_layer(x, gate, up, down, qtypes, op);
  const int64_t T = x.size(0);
  check_f32(weights, op, "weights", 2);
  check_i64(experts, op, "experts", 2);
  const int64_t k = experts.size(1);
  TORCH_CHECK(experts.size(0) == T && weights.sizes() == experts.sizes(), "moeserve::moe: weights ",
              weights.sizes(), " and experts ", experts.sizes(), " for ", T, " tokens");
  TORCH_CHECK(k >= 1 && k <= L.n_experts, "moeserve::moe: ", k, " experts per token of ", L.n_experts);
  Tensor out = empty({T, L.H});
  if (T == 0) return out;
  const int rc = mk_moe(&L, T, k, x.data_ptr<float>(), weights.data_ptr<float>(), experts.data_ptr<int64_t>(),
                        out.data_ptr<float>(), threads());
  TORCH_CHECK(rc != -2, "moeserve::moe: expert id out of range [0, ", L.n_experts, ")");
  TORCH_CHECK(rc == 0, "moeserve::moe: the kernel failed (out of memory?)");
  return out;
}

// The same with the routing done natively: router [E, H] float32 logits, softmax, top-k (ties: lower id first),
// optional renormalisation. Returns (out [T, H], weights [T, top_k], experts [T, top_k] int64).
std::tuple<Tensor, Tensor, Tensor> moe_routed(const Tensor& x, const Tensor& gate, const Tensor& up,
                                              const Tensor& down, at::IntArrayRef qtypes, const Tensor& router,
                                              int64_t top_k, bool renormalize) {
  const char* op = "moe_routed";
  mk_moe_t L = moe_layer(x, gate, up, down, qtypes, op);
  check_f32(router, op, "router", 2);
  TORCH_CHECK(router.size(0) == L.n_experts && router.size(1) == L.H, "moeserve::moe_routed: router is ",
              router.sizes(), ", expected [", L.n_experts, ", ", L.H, "]");
  TORCH_CHECK(top_k >= 1 && top_k <= L.n_experts, "moeserve::moe_routed: top_k ", top_k, " of ", L.n_experts,
              " experts");
  L.router = router.data_ptr<float>();
  L.renormalize = renormalize ? 1 : 0;
  const int64_t T = x.size(0);
  Tensor out = empty({T, L.H});
  Tensor w = empty({T, top_k});
  Tensor ids = empty({T, top_k}, at::kLong);
  if (T == 0) return {out, w, ids};
  const int rc = mk_moe_routed(&L, T, top_k, x.data_ptr<float>(), w.data_ptr<float>(), ids.data_ptr<int64_t>(),
                               out.data_ptr<float>(), threads());
  TORCH_CHECK(rc == 0, "moeserve::moe_routed: the kernel failed (out of memory?)");
  return {out, w, ids};
}

}  // namespace

TORCH_LIBRARY(moeserve, m) {
  m.def("qmatmul(Tensor x, Tensor w, int qtype, int k, int min_gemm_rows, int? expert=None) -> Tensor");
  m.def("qgemm(Tensor x, Tensor w, int qtype, int k, str kind='auto') -> Tensor");
  m.def("qmatmul_multi(Tensor x, Tensor[] ws, int[] qtypes, int k) -> Tensor[]");
  m.def("qkv_rope(Tensor x, Tensor[] ws, int[] qtypes, Tensor? q_norm, Tensor? k_norm, Tensor positions, "
        "Tensor cos, Tensor sin, int n_heads, int n_kv_heads, int head_dim, float eps, int rope_dim, bool neox) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("norm_rope_(Tensor(a!) x, Tensor? weight, Tensor positions, Tensor cos, Tensor sin, float eps, "
        "int rope_dim, bool neox) -> Tensor(a!)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("dequant_rows(Tensor raw, int qtype, int k) -> Tensor");
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, Tensor lens, Tensor? table, int block_size, int window, "
        "float scale) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("moe(Tensor x, Tensor weights, Tensor experts, Tensor gate, Tensor up, Tensor down, int[] qtypes) -> Tensor");
  m.def("moe_routed(Tensor x, Tensor gate, Tensor up, Tensor down, int[] qtypes, Tensor router, int top_k, "
        "bool renormalize) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moeserve, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qgemm", &qgemm);
  m.impl("qmatmul_multi", &qmatmul_multi);
  m.impl("qkv_rope", &qkv_rope);
  m.impl("norm_rope_", &norm_rope_);
  m.impl("rms_norm", &rms_norm);
  m.impl("dequant_rows", &dequant_rows);
  m.impl("attn_decode", &attn_decode);
  m.impl("argmax", &argmax);
  m.impl("moe", &moe);
  m.impl("moe_routed", &moe_routed);
}
