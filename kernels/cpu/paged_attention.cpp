// Paged decode attention for the CPU: one query token per sequence attends over its context,
// read in place from the paged cache (no gather copy, no padding to the longest sequence).
//
// Layouts (vLLM's): query [B, H, D]; k_cache, v_cache [N, S, K, D]; block_tables [B, M] int64;
// context_lens [B] int64. H = K * G (GQA). One task per (sequence, kv head): the G query heads of
// the kv head share each K/V row load. Online softmax in fp32, one rescale per cache block.
// Vectors are GCC vector extensions (16 floats): AVX-512 where the CPU has it, split otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kWidth = 16;
typedef float vfloat __attribute__((vector_size(kWidth * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vfloat load(const at::BFloat16* p) {
  float tmp[kWidth];
  for (int i = 0; i < kWidth; ++i) {
    uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;  // bf16 is the top half of an fp32
    std::memcpy(&tmp[i], &bits, sizeof(float));
  }
  return load(tmp);
}

inline vfloat load(const at::Half* p) {
  float tmp[kWidth];
  for (int i = 0; i < kWidth; ++i) tmp[i] = static_cast<float>(p[i]);
  return load(tmp);
}

typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vfloat4 __attribute__((vector_size(4 * sizeof(float))));

inline float hsum(vfloat v) {  // halving tree: 16 -> 8 -> 4 lanes, then scalars
  vfloat8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const vfloat8 s8 = lo8 + hi8;
  vfloat4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const vfloat4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <typename T>
void decode_kernel(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
                   torch::Tensor& out) {
  const int64_t batch = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t groups = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t chunks = dim / kWidth;
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o_ptr = out.data_ptr<T>();
  const int64_t token_stride = num_kv_heads * dim;  // between positions of one block

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<vfloat> q(groups * chunks), acc(groups * chunks), row(chunks);
    std::vector<float> m(groups), l(groups), score(groups * block_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, kv = task % num_kv_heads;
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = q_ptr + (b * num_heads + kv * groups + g) * dim;
        for (int64_t c = 0; c < chunks; ++c) {
          q[g * chunks + c] = load(src + c * kWidth) * static_cast<float>(scale);
          acc[g * chunks + c] = vfloat{};
        }
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      const int64_t ctx = lens[b];
      for (int64_t start = 0; start < ctx; start += block_size) {
        const int64_t block = tables[b * max_blocks + start / block_size];
        const int64_t count = std::min(block_size, ctx - start);
        const T* k = k_ptr + block * block_size * token_stride + kv * dim;
        const T* v = v_ptr + block * block_size * token_stride + kv * dim;
        for (int64_t j = 0; j < count; ++j) {  // scores of the whole block
          for (int64_t c = 0; c < chunks; ++c) row[c] = load(k + j * token_stride + c * kWidth);
          for (int64_t g = 0; g < groups; ++g) {
            vfloat sum = q[g * chunks] * row[0];
            for (int64_t c = 1; c < chunks; ++c) sum += q[g * chunks + c] * row[c];
            score[g * block_size + j] = hsum(sum);
          }
        }
        for (int64_t g = 0; g < groups; ++g) {  // softmax bookkeeping, one rescale per block
          float* s = score.data() + g * block_size;
          const float block_max = *std::max_element(s, s + count);
          if (block_max > m[g]) {
            const float correction = std::exp(m[g] - block_max);
            l[g] *= correction;
            for (int64_t c = 0; c < chunks; ++c) acc[g * chunks + c] *= correction;
            m[g] = block_max;
          }
          for (int64_t j = 0; j < count; ++j) {
            s[j] = std::exp(s[j] - m[g]);
            l[g] += s[j];
          }
        }
        for (int64_t j = 0; j < count; ++j) {  // weighted values
          for (int64_t c = 0; c < chunks; ++c) row[c] = load(v + j * token_stride + c * kWidth);
          for (int64_t g = 0; g < groups; ++g) {
            const float p = score[g * block_size + j];
            for (int64_t c = 0; c < chunks; ++c) acc[g * chunks + c] += p * row[c];
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        T* dst = o_ptr + (b * num_heads + kv * groups + g) * dim;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const vfloat o = acc[g * chunks + c] * inv;
          for (int i = 0; i < kWidth; ++i) dst[c * kWidth + i] = static_cast<T>(o[i]);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "need contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(query.size(2) == k_cache.size(3) && query.size(2) % kWidth == 0, "head dim must match, multiple of 16");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = torch::empty_like(query);
  switch (query.scalar_type()) {
    case torch::kFloat: decode_kernel<float>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case torch::kBFloat16: decode_kernel<at::BFloat16>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case torch::kHalf: decode_kernel<at::Half>(query, k_cache, v_cache, tables, lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention: float32, bfloat16 or float16 only");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
