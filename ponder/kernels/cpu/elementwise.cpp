// Fused element-wise ops for the CPU, rounding exactly where the eager torch versions round (so
// bf16 results match transformers' layer by layer): RMSNorm with an optional residual add, and
// SiLU-and-mul on a packed gate|up projection. Rows are split across threads; each row is walked
// 16 lanes at a time with a scalar tail.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <cmath>
#include <vector>

namespace {

using namespace ponder;  // NOLINT: vector helpers

template <typename T>
inline float round_scalar(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// x [T, E] (rows may be strided), weight [E]; residual [T, E] or null. With a residual:
// residual <- x + residual (rounded to T), out <- weight * norm(residual). Statistics in fp32.
template <typename T>
void rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& weight, T* residual, double eps,
                     torch::Tensor& out) {
  const int64_t rows = x.size(0), hidden = x.size(1), x_stride = x.stride(0);
  const int64_t vec_end = hidden / kWidth * kWidth;
  const T* x_ptr = x.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t t = begin; t < end; ++t) {
      const T* xr = x_ptr + t * x_stride;
      T* rr = residual ? residual + t * hidden : nullptr;
      vfloat sum_v = {};
      float sum = 0.f;
      for (int64_t i = 0; i < vec_end; i += kWidth) {
        vfloat v = load(xr + i);
        if (rr) {
          v = round_through<T>(v + load(rr + i));
          store(rr + i, v);
        }
        store(h.data() + i, v);
        sum_v += v * v;
      }
      for (int64_t i = vec_end; i < hidden; ++i) {
        float v = static_cast<float>(xr[i]);
        if (rr) {
          v = round_scalar<T>(v + static_cast<float>(rr[i]));
          rr[i] = static_cast<T>(v);
        }
        h[i] = v;
        sum += v * v;
      }
      sum += hsum(sum_v);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + static_cast<float>(eps));
      T* o = o_ptr + t * hidden;
      for (int64_t i = 0; i < vec_end; i += kWidth)
        store(o + i, load(w_ptr + i) * round_through<T>(load(h.data() + i) * inv));
      for (int64_t i = vec_end; i < hidden; ++i)
        o[i] = static_cast<T>(static_cast<float>(w_ptr[i]) * round_scalar<T>(h[i] * inv));
    }
  });
}

template <typename T>
void silu_and_mul_kernel(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t rows = x.size(0), width = out.size(1);
  const int64_t vec_end = width / kWidth * kWidth;
  const T* x_ptr = x.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = x_ptr + t * 2 * width;
      const T* up = gate + width;
      T* o = o_ptr + t * width;
      for (int64_t i = 0; i < vec_end; i += kWidth) {
        const vfloat g = load(gate + i);
        const vfloat activated = round_through<T>(g / (1.f + vexp(-g)));
        store(o + i, activated * load(up + i));
      }
      for (int64_t i = vec_end; i < width; ++i) {
        const float g = static_cast<float>(gate[i]);
        o[i] = static_cast<T>(round_scalar<T>(g / (1.f + std::exp(-g))) * static_cast<float>(up[i]));
      }
    }
  });
}

template <typename F>
void dispatch(const torch::Tensor& t, const char* name, F&& body) {
  switch (t.scalar_type()) {
    case torch::kFloat: body(float{}); break;
    case torch::kBFloat16: body(at::BFloat16{}); break;
    case torch::kHalf: body(at::Half{}); break;
    default: TORCH_CHECK(false, name, ": float32, bfloat16 or float16 only");
  }
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.size(0) == x.size(1), "rms_norm: bad shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: dtypes differ");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T>(x, weight.contiguous(), nullptr, eps, out);
  });
  return out;
}

// residual is updated in place (residual += x); returns the normed sum.
torch::Tensor fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && residual.is_contiguous() && residual.sizes() == x.sizes(),
              "fused_add_rms_norm: bad shapes");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "fused_add_rms_norm: dtypes differ");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x, "fused_add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T>(x, weight.contiguous(), residual.data_ptr<T>(), eps, out);
  });
  return out;
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [T, 2I]");
  auto input = x.contiguous();
  auto out = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch(x, "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_kernel<T>(input, out);
  });
  return out;
}
