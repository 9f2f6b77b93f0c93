// Causal self-attention with ALiBi for fp32 training on CPU: forward and backward (cpu_attention.py).
//
// PyTorch's CPU flash attention takes ALiBi only as a dense bias, so it computes every score of the rows it
// is given, the masked ones too. Here the bias is computed from the slopes, key blocks above the diagonal
// are skipped, and each (batch, head) is one task whose operands are first packed into contiguous blocks:
// rows strided by heads * head_dim floats map to the same L1 sets and thrash them.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
// Queries and keys per tile: a 64 x 64 score tile and 64-row operand panels fit in L1 together.
constexpr int64_t BLOCK = 64;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C[r, 0:NV*W] = alpha * sum_k A(r, k) * B[k, 0:NV*W] (+ C[r, 0:NV*W] if accumulate), for R rows.
// A(r, k) = a[r * a_row + k * a_col], so A may be read transposed. The R x NV accumulators stay in registers.
template <int R, int NV>
inline void tile_rows(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col, const float* b,
                      int64_t ldb, int64_t K, float alpha, bool accumulate) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      Vec av(a[r * a_row + k * a_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  const Vec va(alpha);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      Vec out = acc[r][v] * va;
      if (accumulate) out = out + Vec::loadu(c + r * ldc + v * W);
      out.store(c + r * ldc + v * W);
    }
}

template <int NV>
void tile_panel(float* c, int64_t ldc, int64_t rows, const float* a, int64_t a_row, int64_t a_col,
                const float* b, int64_t ldb, int64_t K, float alpha, bool accumulate) {
  constexpr int R = 24 / NV;  // 24 accumulators, leaving registers for B and the broadcast A
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    tile_rows<R, NV>(c + r * ldc, ldc, a + r * a_row, a_row, a_col, b, ldb, K, alpha, accumulate);
  for (; r + 4 <= rows; r += 4)
    tile_rows<4, NV>(c + r * ldc, ldc, a + r * a_row, a_row, a_col, b, ldb, K, alpha, accumulate);
  for (; r < rows; ++r)
    tile_rows<1, NV>(c + r * ldc, ldc, a + r * a_row, a_row, a_col, b, ldb, K, alpha, accumulate);
}

// The same for `cols` columns (a multiple of W), in panels of at most 4 vectors.
void tile(float* c, int64_t ldc, int64_t rows, int64_t cols, const float* a, int64_t a_row, int64_t a_col,
          const float* b, int64_t ldb, int64_t K, float alpha, bool accumulate) {
  for (int64_t c0 = 0; c0 < cols; c0 += 4 * W) {
    switch (std::min<int64_t>(4, (cols - c0) / W)) {
      case 4: tile_panel<4>(c + c0, ldc, rows, a, a_row, a_col, b + c0, ldb, K, alpha, accumulate); break;
      case 3: tile_panel<3>(c + c0, ldc, rows, a, a_row, a_col, b + c0, ldb, K, alpha, accumulate); break;
      case 2: tile_panel<2>(c + c0, ldc, rows, a, a_row, a_col, b + c0, ldb, K, alpha, accumulate); break;
      default: tile_panel<1>(c + c0, ldc, rows, a, a_row, a_col, b + c0, ldb, K, alpha, accumulate);
    }
  }
}

// One (batch, head) of a (batch, heads, seq, head_dim) tensor: its first row and the stride between rows.
struct Rows {
  float* p;
  int64_t stride;
};

Rows rows_of(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<float>() + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// x's rows copied to (seq_pad, d), zeros past seq.
void pack_rows(const Rows& x, int64_t seq, int64_t d, int64_t seq_pad, std::vector<float>& out) {
  out.resize(seq_pad * d);
  for (int64_t j = 0; j < seq; ++j) std::copy(x.p + j * x.stride, x.p + j * x.stride + d, out.data() + j * d);
  std::fill(out.begin() + seq * d, out.end(), 0.f);
}

// x's rows as transposed panels (seq_pad / BLOCK, d, BLOCK): the B operand of q @ k^T, zeros past seq.
void pack_panels(const Rows& x, int64_t seq, int64_t d, int64_t seq_pad, std::vector<float>& out) {
  out.assign(seq_pad * d, 0.f);
  for (int64_t j0 = 0; j0 < seq; j0 += BLOCK)
    at::vec::transpose_mxn<float>(x.p + j0 * x.stride, x.stride, out.data() + j0 * d, BLOCK,
                                  static_cast<int>(std::min(BLOCK, seq - j0)), static_cast<int>(d));
}

void unpack_rows(const std::vector<float>& x, int64_t seq, int64_t d, const Rows& out) {
  for (int64_t j = 0; j < seq; ++j) std::copy(x.data() + j * d, x.data() + (j + 1) * d, out.p + j * out.stride);
}

// ALiBi's -slope * (i - j) and the causal mask for one score tile of queries i0.. and keys j0.. (keys past the
// sequence are above the diagonal too).
class AlibiCausal {
 public:
  AlibiCausal(float slope, int64_t i0, int64_t j0)
      : slope_(slope), i0_(i0), j0_(j0), lanes_(Vec::arange(0.f, 1.f)) {}

  // Row r's scores at keys j0 + j .. j0 + j + W with the bias added, -inf above the diagonal.
  Vec biased(const float* row, int64_t r, int64_t j) const {
    const Vec distance = Vec(static_cast<float>(j0_ + j - i0_ - r)) + lanes_;
    const Vec scores = at::vec::fmadd(Vec(slope_), distance, Vec::loadu(row + j));
    return Vec::blendv(scores, Vec(NEG_INF), distance > Vec(0.f));
  }

 private:
  float slope_;
  int64_t i0_, j0_;
  Vec lanes_;
};

struct Shape {
  int64_t batch, heads, seq, dim, seq_pad, blocks;
};

Shape check_inputs(const std::vector<at::Tensor>& tensors, const at::Tensor& slopes) {
  const at::Tensor& q = tensors[0];
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.sizes() == q.sizes(),
                "cpu_attention: expected fp32 CPU tensors of shape ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.stride(3) == 1, "cpu_attention: the head dimension must be contiguous");
  }
  TORCH_CHECK(q.size(3) % W == 0, "cpu_attention: head_dim ", q.size(3), " is not a multiple of ", W);
  TORCH_CHECK(slopes.is_contiguous() && slopes.scalar_type() == at::kFloat &&
                  (slopes.numel() == 0 || slopes.numel() == q.size(1)),
              "cpu_attention: slopes must be fp32, one per head or none");
  const int64_t seq_pad = (q.size(2) + BLOCK - 1) / BLOCK * BLOCK;
  return {q.size(0), q.size(1), q.size(2), q.size(3), seq_pad, seq_pad / BLOCK};
}

// q, k and v of a (batch, seq, heads, 3, d) tensor, each as a (batch, heads, seq, d) view.
std::array<at::Tensor, 3> split_qkv(const at::Tensor& qkv) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(3) == 3, "cpu_attention: expected qkv of shape (batch, seq, heads, 3, "
              "head_dim), got ", qkv.sizes());
  return {qkv.select(3, 0).transpose(1, 2), qkv.select(3, 1).transpose(1, 2), qkv.select(3, 2).transpose(1, 2)};
}

// Runs per_thread() once on each thread, for the scratch buffers its result captures, then that result for each
// (batch, head) the thread takes, as (b, h, slope).
template <typename PerThread>
void for_each_head(const Shape& n, const at::Tensor& slopes, PerThread per_thread) {
  const float* slope_data = slopes.numel() ? slopes.data_ptr<float>() : nullptr;
  at::parallel_for(0, n.batch * n.heads, 1, [&](int64_t begin, int64_t end) {
    auto per_head = per_thread();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % n.heads;
      per_head(bh / n.heads, h, slope_data ? slope_data[h] : 0.f);
    }
  });
}

}  // namespace

// qkv: (batch, seq, heads, 3, head_dim), per head [q, k, v] (BLOOM's fused projection). slopes: (heads,), or
// empty for no ALiBi. Returns the output, (batch, heads, seq, head_dim) in (batch, seq, heads, head_dim) memory
// (what the caller's transpose and reshape read), and the log-sum-exp of each query's scores (batch, heads, seq),
// which backward() needs.
std::vector<at::Tensor> forward(const at::Tensor& qkv, const at::Tensor& slopes, double scale_) {
  const auto [q, k, v] = split_qkv(qkv);
  const Shape n = check_inputs({q, k, v}, slopes);
  const float scale = static_cast<float>(scale_);
  at::Tensor out = at::empty({n.batch, n.seq, n.heads, n.dim}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({n.batch, n.heads, n.seq}, q.options());
  for_each_head(n, slopes, [&] {
    return [&, qp = std::vector<float>(), kt = std::vector<float>(), vp = std::vector<float>(),
            s = std::vector<float>(BLOCK * BLOCK), acc = std::vector<float>(BLOCK * n.dim),
            max = std::vector<float>(BLOCK), sum = std::vector<float>(BLOCK)](int64_t b, int64_t h,
                                                                              float slope) mutable {
      pack_rows(rows_of(q, b, h), n.seq, n.dim, n.seq_pad, qp);
      pack_panels(rows_of(k, b, h), n.seq, n.dim, n.seq_pad, kt);
      pack_rows(rows_of(v, b, h), n.seq, n.dim, n.seq_pad, vp);
      const Rows o = rows_of(out, b, h);
      float* lse_h = lse.data_ptr<float>() + (b * n.heads + h) * n.seq;
      for (int64_t qb = 0; qb < n.blocks; ++qb) {
        const int64_t i0 = qb * BLOCK, rows = std::min(BLOCK, n.seq - i0);
        std::fill(max.begin(), max.end(), NEG_INF);
        std::fill(sum.begin(), sum.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t kb = 0; kb <= qb; ++kb) {
          const int64_t j0 = kb * BLOCK;
          tile(s.data(), BLOCK, rows, BLOCK, qp.data() + i0 * n.dim, n.dim, 1, kt.data() + j0 * n.dim, BLOCK,
               n.dim, scale, false);
          // Online softmax: what earlier key blocks summed is rescaled when a row's maximum grows.
          const AlibiCausal bias(slope, i0, j0);
          for (int64_t r = 0; r < rows; ++r) {
            float* row = s.data() + r * BLOCK;
            Vec row_max(max[r]);
            for (int64_t j = 0; j < BLOCK; j += W) {
              const Vec scores = bias.biased(row, r, j);
              scores.store(row + j);
              row_max = at::vec::maximum(row_max, scores);
            }
            const float new_max =
                at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, row_max);
            Vec row_sum(0.f);
            for (int64_t j = 0; j < BLOCK; j += W) {
              const Vec p = (Vec::loadu(row + j) - Vec(new_max)).exp_u20();
              row_sum = row_sum + p;
              p.store(row + j);
            }
            const float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, row_sum);
            if (new_max == max[r]) {
              sum[r] += total;
            } else {
              const float rescale = std::exp(max[r] - new_max);
              sum[r] = sum[r] * rescale + total;
              max[r] = new_max;
              at::vec::map([rescale](Vec x) { return x * Vec(rescale); }, acc.data() + r * n.dim,
                           acc.data() + r * n.dim, n.dim);
            }
          }
          tile(acc.data(), n.dim, rows, n.dim, s.data(), BLOCK, 1, vp.data() + j0 * n.dim, n.dim,
               std::min(BLOCK, n.seq - j0), 1.f, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float inverse = 1.f / sum[r];
          at::vec::map([inverse](Vec x) { return x * Vec(inverse); }, o.p + (i0 + r) * o.stride,
                       acc.data() + r * n.dim, n.dim);
          lse_h[i0 + r] = max[r] + std::log(sum[r]);
        }
      }
    };
  });
  return {out, lse};
}

// The gradient of forward() with respect to qkv, in qkv's shape.
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& slopes, double scale_) {
  const auto [q, k, v] = split_qkv(qkv);
  const Shape n = check_inputs({grad_out, q, k, v, out}, slopes);
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == n.batch * n.heads * n.seq, "cpu_attention: bad lse");
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  const auto [grad_q, grad_k, grad_v] = split_qkv(grad_qkv);
  const float scale = static_cast<float>(scale_);
  for_each_head(n, slopes, [&] {
    return [&, qp = std::vector<float>(), kp = std::vector<float>(), kt = std::vector<float>(),
            vt = std::vector<float>(), gp = std::vector<float>(), dq = std::vector<float>(),
            dk = std::vector<float>(), dv = std::vector<float>(), delta = std::vector<float>(n.seq_pad),
            p = std::vector<float>(BLOCK * BLOCK),
            ds = std::vector<float>(BLOCK * BLOCK)](int64_t b, int64_t h, float slope) mutable {
      pack_rows(rows_of(q, b, h), n.seq, n.dim, n.seq_pad, qp);
      pack_rows(rows_of(k, b, h), n.seq, n.dim, n.seq_pad, kp);
      pack_rows(rows_of(grad_out, b, h), n.seq, n.dim, n.seq_pad, gp);
      pack_panels(rows_of(k, b, h), n.seq, n.dim, n.seq_pad, kt);
      pack_panels(rows_of(v, b, h), n.seq, n.dim, n.seq_pad, vt);
      dq.assign(n.seq_pad * n.dim, 0.f);
      dk.assign(n.seq_pad * n.dim, 0.f);
      dv.assign(n.seq_pad * n.dim, 0.f);
      const Rows o = rows_of(out, b, h);
      const float* lse_h = lse.data_ptr<float>() + (b * n.heads + h) * n.seq;
      // delta_i = dO_i . O_i, the softmax backward's term for row i.
      for (int64_t i = 0; i < n.seq; ++i)
        delta[i] = at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; },
                                                   [](Vec x, Vec y) { return x + y; }, gp.data() + i * n.dim,
                                                   o.p + i * o.stride, n.dim);
      for (int64_t qb = 0; qb < n.blocks; ++qb) {
        const int64_t i0 = qb * BLOCK, rows = std::min(BLOCK, n.seq - i0);
        const float* q_block = qp.data() + i0 * n.dim;
        const float* g_block = gp.data() + i0 * n.dim;
        for (int64_t kb = 0; kb <= qb; ++kb) {
          const int64_t j0 = kb * BLOCK, keys = std::min(BLOCK, n.seq - j0);
          // p = softmax rows recomputed from the saved log-sum-exp; ds = p * (dO v^T - delta).
          tile(p.data(), BLOCK, rows, BLOCK, q_block, n.dim, 1, kt.data() + j0 * n.dim, BLOCK, n.dim, scale,
               false);
          tile(ds.data(), BLOCK, rows, BLOCK, g_block, n.dim, 1, vt.data() + j0 * n.dim, BLOCK, n.dim, 1.f,
               false);
          const AlibiCausal bias(slope, i0, j0);
          for (int64_t r = 0; r < rows; ++r) {
            float* p_row = p.data() + r * BLOCK;
            float* ds_row = ds.data() + r * BLOCK;
            const Vec row_lse(lse_h[i0 + r]), row_delta(delta[i0 + r]);
            for (int64_t j = 0; j < BLOCK; j += W) {
              const Vec pv = (bias.biased(p_row, r, j) - row_lse).exp_u20();
              pv.store(p_row + j);
              (pv * (Vec::loadu(ds_row + j) - row_delta)).store(ds_row + j);
            }
          }
          // dv += p^T dO, dk += scale * ds^T q, dq += scale * ds k: p and ds read transposed for the first two.
          tile(dv.data() + j0 * n.dim, n.dim, keys, n.dim, p.data(), 1, BLOCK, g_block, n.dim, rows, 1.f, true);
          tile(dk.data() + j0 * n.dim, n.dim, keys, n.dim, ds.data(), 1, BLOCK, q_block, n.dim, rows, scale, true);
          tile(dq.data() + i0 * n.dim, n.dim, rows, n.dim, ds.data(), BLOCK, 1, kp.data() + j0 * n.dim, n.dim,
               keys, scale, true);
        }
      }
      unpack_rows(dq, n.seq, n.dim, rows_of(grad_q, b, h));
      unpack_rows(dk, n.seq, n.dim, rows_of(grad_k, b, h));
      unpack_rows(dv, n.seq, n.dim, rows_of(grad_v, b, h));
    };
  });
  return grad_qkv;
}

int64_t vector_width() { return W; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("vector_width", &vector_width);
}
