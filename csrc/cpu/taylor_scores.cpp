// taylor_scores on CPU: one pass over (act, grad) of shape (B, T, C).
//
// token[b, t] = |sum_c g*a|, channel[c] = sum_b |sum_t g*a|. Work items are (sample, token chunk) pairs
// so that a small batch still feeds every thread; each item writes its own per-channel partial sums
// (items x C, small), and the |.| per sample is taken only after the chunks of a sample are added.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace skd::cpu {
namespace {

// Sums of partials (items x C) up to this many elements are added on one thread (~0.3 ms).
constexpr int64_t kSerialReduce = 1 << 20;

template <typename scalar_t>
void taylor_kernel(const at::Tensor& act, const at::Tensor& grad, at::Tensor& token, at::Tensor& channel,
                   int64_t t_chunk) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const int64_t B = act.size(0), T = act.size(1), C = act.size(2);
  const int64_t n_chunks = (T + t_chunk - 1) / t_chunk;
  const int64_t items = B * n_chunks;
  // Per-item column sums: items x C in the accumulation type.
  at::Tensor partial = at::empty({items, C}, act.options().dtype(acc_dtype(act.scalar_type())));
  const scalar_t* a_ptr = act.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
  const int64_t a_sb = act.stride(0), a_st = act.stride(1), g_sb = grad.stride(0), g_st = grad.stride(1);
  acc* part = partial.mutable_data_ptr<acc>();
  acc* tok = token.mutable_data_ptr<acc>();
  const int64_t vec_end = C - C % Vec::size();

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_chunks;
      const int64_t t0 = (item % n_chunks) * t_chunk, t1 = std::min(T, t0 + t_chunk);
      acc* col = part + item * C;
      std::fill(col, col + C, acc(0));
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* a = a_ptr + b * a_sb + t * a_st;
        const scalar_t* g = g_ptr + b * g_sb + t * g_st;
        Vec dot(0);
        int64_t c = 0;
        for (; c < vec_end; c += Vec::size()) {
          const Vec p = load_acc(a + c) * load_acc(g + c);
          dot = dot + p;
          (Vec::loadu(col + c) + p).store(col + c);
        }
        acc dot_s = at::vec::vec_reduce_all<acc>([](Vec x, Vec y) { return x + y; }, dot);
        for (; c < C; ++c) {
          const acc p = static_cast<acc>(a[c]) * static_cast<acc>(g[c]);
          dot_s += p;
          col[c] += p;
        }
        tok[b * T + t] = std::abs(dot_s);
      }
    }
  });

  // channel[c] = sum_b |sum_chunks partial[b, chunk, c]|. This pass is 1/T of the first (or tiny when tokens
  // are split), so it runs on the calling thread unless it is large: a second parallel region ends in a
  // barrier, which costs a scheduler slice whenever another process holds one of the cores.
  acc* ch = channel.mutable_data_ptr<acc>();
  at::parallel_for(0, C, std::max<int64_t>(256, kSerialReduce / items), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc total = 0;
      for (int64_t b = 0; b < B; ++b) {
        acc s = 0;
        for (int64_t k = 0; k < n_chunks; ++k) s += part[(b * n_chunks + k) * C + c];
        total += std::abs(s);
      }
      ch[c] = total;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> taylor_scores_cpu(const at::Tensor& act_in, const at::Tensor& grad_in) {
  TORCH_CHECK(act_in.dim() == 3 && act_in.sizes() == grad_in.sizes(), "act, grad must be (B, T, C) of one shape");
  TORCH_CHECK(act_in.scalar_type() == grad_in.scalar_type(), "act and grad must share a dtype");
  // Rows are read with their own strides; only a strided channel axis needs a copy to vectorise.
  const at::Tensor act = act_in.stride(2) == 1 ? act_in : act_in.contiguous();
  const at::Tensor grad = grad_in.stride(2) == 1 ? grad_in : grad_in.contiguous();
  const int64_t B = act.size(0), T = act.size(1), C = act.size(2);
  const auto opts = act.options().dtype(acc_dtype(act.scalar_type()));
  at::Tensor token = at::empty({B, T}, opts);
  at::Tensor channel = at::empty({C}, opts);
  if (B * T == 0 || C == 0) {
    token.zero_();
    channel.zero_();
    return {token, channel};
  }
  // Split tokens only when there are too few samples to occupy the threads (4 items per thread).
  const int64_t want_items = 4 * at::get_num_threads();
  const int64_t t_chunk = B >= want_items ? T : std::max<int64_t>(1, (T * B + want_items - 1) / want_items);
  SKD_DISPATCH_FLOATS(act.scalar_type(), "skd_taylor_scores", [&] {
    taylor_kernel<scalar_t>(act, grad, token, channel, t_chunk);
  });
  return {token, channel};
}

}  // namespace
}  // namespace skd::cpu

TORCH_LIBRARY_IMPL(skd_kernels, CPU, m) {
  m.impl("taylor_scores", &skd::cpu::taylor_scores_cpu);
}
