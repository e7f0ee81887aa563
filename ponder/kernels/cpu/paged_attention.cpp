// Paged attention for the CPU. Decode: one query token per sequence attends over its context,
// read in place from the paged cache (no gather copy, no padding to the longest sequence).
//
// Layouts (vLLM's): query [B, H, D]; k_cache, v_cache [N, S, K, D]; block_tables [B, M] int64;
// context_lens [B] int64. H = K * G (GQA): the G query heads of a kv head share each K/V row load.
// Online softmax in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace ponder;  // NOLINT: vector helpers

template <typename T, int kChunks>
void decode_kernel(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
                   torch::Tensor& out) {
  const int64_t batch = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t groups = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  constexpr int64_t chunks = kChunks;  // compile-time: a K/V row lives in registers
  const T* q_ptr = query.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o_ptr = out.data_ptr<T>();
  const int64_t token_stride = num_kv_heads * dim;  // between positions of one block
  const int64_t tile = kWidth;

  // One task per sequence: each position's K/V row holds every kv head side by side, so a task
  // walks each cache block front to back (prefetch-friendly) instead of striding through it.
  // Sequences are dealt out in stripes (thread t takes t, t + n, ...): contexts differ in length,
  // and striping balances the threads where contiguous halves would not.
  const int64_t stripes = std::min<int64_t>(at::get_num_threads(), batch);
  at::parallel_for(0, stripes, 1, [&](int64_t first_stripe, int64_t last_stripe) {
    std::vector<vfloat> q(num_heads * chunks), acc(num_heads * chunks);
    vfloat row[kChunks];
    std::vector<float> m(num_heads), l(num_heads), score(num_heads * kWidth);
    for (int64_t stripe = first_stripe; stripe < last_stripe; ++stripe)
    for (int64_t b = stripe; b < batch; b += stripes) {
      for (int64_t h = 0; h < num_heads; ++h) {
        const T* src = q_ptr + (b * num_heads + h) * dim;
        for (int64_t c = 0; c < chunks; ++c) {
          q[h * chunks + c] = load(src + c * kWidth) * static_cast<float>(scale);
          acc[h * chunks + c] = vfloat{};
        }
        m[h] = -std::numeric_limits<float>::infinity();
        l[h] = 0.f;
      }
      const int64_t ctx = lens[b];
      // Tiles of up to 16 positions inside one cache block: scores first, then one vector exp and
      // one rescale per tile and query head, then the weighted values.
      for (int64_t start = 0, count = 0; start < ctx; start += count) {
        const int64_t block = tables[b * max_blocks + start / block_size];
        count = std::min({tile, ctx - start, block_size - start % block_size});
        const int64_t first = (block * block_size + start % block_size) * token_stride;
        const T* k = k_ptr + first;
        const T* v = v_ptr + first;
        if (start + count < ctx) {  // the next tile's rows are in another block: ask for them early
          const int64_t next = tables[b * max_blocks + (start + count) / block_size];
          const int64_t next_first = (next * block_size + (start + count) % block_size) * token_stride;
          for (int64_t byte = 0; byte < token_stride * static_cast<int64_t>(sizeof(T)) * 2; byte += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(k_ptr + next_first) + byte);
            __builtin_prefetch(reinterpret_cast<const char*>(v_ptr + next_first) + byte);
          }
        }
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
            const T* k_row = k + j * token_stride + kv * dim;
            for (int64_t c = 0; c < chunks; ++c) row[c] = load(k_row + c * kWidth);
            for (int64_t h = kv * groups; h < (kv + 1) * groups; ++h) {
              vfloat sum = q[h * chunks] * row[0];
              for (int64_t c = 1; c < chunks; ++c) sum += q[h * chunks + c] * row[c];
              score[h * kWidth + j] = hsum(sum);
            }
          }
        }
        for (int64_t h = 0; h < num_heads; ++h) {
          vfloat s = load(score.data() + h * kWidth);
          for (int64_t j = count; j < kWidth; ++j) s[j] = -std::numeric_limits<float>::infinity();
          const float tile_max = hmax(s);
          if (tile_max > m[h]) {  // new running max: rescale what was accumulated so far
            const float correction = std::exp(m[h] - tile_max);
            l[h] *= correction;
            for (int64_t c = 0; c < chunks; ++c) acc[h * chunks + c] *= correction;
            m[h] = tile_max;
          }
          const vfloat p = vexp(s - m[h]);
          l[h] += hsum(p);
          std::memcpy(score.data() + h * kWidth, &p, sizeof(p));
        }
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t kv = 0; kv < num_kv_heads; ++kv) {
            const T* v_row = v + j * token_stride + kv * dim;
            for (int64_t c = 0; c < chunks; ++c) row[c] = load(v_row + c * kWidth);
            for (int64_t h = kv * groups; h < (kv + 1) * groups; ++h) {
              const float p = score[h * kWidth + j];
              for (int64_t c = 0; c < chunks; ++c) acc[h * chunks + c] += p * row[c];
            }
          }
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        T* dst = o_ptr + (b * num_heads + h) * dim;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const vfloat o = acc[h * chunks + c] * inv;
          for (int i = 0; i < kWidth; ++i) dst[c * kWidth + i] = static_cast<T>(o[i]);
        }
      }
    }
  });
}

template <typename T>
void dispatch_dim(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                  const torch::Tensor& tables, const torch::Tensor& lens, double scale, torch::Tensor& out) {
  switch (query.size(2) / kWidth) {
    case 1: decode_kernel<T, 1>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 2: decode_kernel<T, 2>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 4: decode_kernel<T, 4>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 8: decode_kernel<T, 8>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 16: decode_kernel<T, 16>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 32: decode_kernel<T, 32>(query, k_cache, v_cache, tables, lens, scale, out); break;
    // MLA's latent rows (kv_lora_rank + rope dims): 80 and 160 for the tiny models, 576 for R1
    case 5: decode_kernel<T, 5>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 10: decode_kernel<T, 10>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case 36: decode_kernel<T, 36>(query, k_cache, v_cache, tables, lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention: head dim ", query.size(2), " is not supported");
  }
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
    case torch::kFloat: dispatch_dim<float>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case torch::kBFloat16: dispatch_dim<at::BFloat16>(query, k_cache, v_cache, tables, lens, scale, out); break;
    case torch::kHalf: dispatch_dim<at::Half>(query, k_cache, v_cache, tables, lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention: float32, bfloat16 or float16 only");
  }
  return out;
}

constexpr int64_t kMaskElements = int64_t{32} << 20;  // rows x keys of one prefill mask block

// Prefill over a paged prefix, variable lengths: one sequence at a time inside the op, each through
// ATen's blocked (flash) CPU attention on its own context, so nothing is padded to the longest
// sequence and the causal mask skips whole tiles when there is no cached prefix.
// query [T, H, D] (sequences back to back); query_start_loc [B+1]; context_lens [B] (prefix + new).
torch::Tensor paged_prefill_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor block_tables, torch::Tensor query_start_loc,
                                      torch::Tensor context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const int64_t batch = block_tables.size(0);
  auto starts = query_start_loc.to(torch::kCPU).contiguous();
  auto lens = context_lens.to(torch::kCPU).contiguous();
  const int64_t* start_ptr = starts.data_ptr<int64_t>();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  auto out = torch::empty_like(query);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t begin = start_ptr[b], end = start_ptr[b + 1], ctx = len_ptr[b];
    const int64_t q_len = end - begin, prefix = ctx - q_len;
    const int64_t blocks = (ctx + block_size - 1) / block_size;
    auto table = block_tables[b].slice(0, 0, blocks);
    // [blocks, S, K, D] -> [1, K, ctx, D] (a strided view: the flash kernel reads strides)
    auto keys = k_cache.index_select(0, table).view({blocks * block_size, num_kv_heads, dim});
    auto values = v_cache.index_select(0, table).view({blocks * block_size, num_kv_heads, dim});
    keys = keys.slice(0, 0, ctx).transpose(0, 1).unsqueeze(0);
    values = values.slice(0, 0, ctx).transpose(0, 1).unsqueeze(0);
    auto q = query.slice(0, begin, end).transpose(0, 1).unsqueeze(0);  // [1, H, Q, D]
    if (q.scalar_type() != torch::kFloat) {  // ATen's CPU flash attention is faster in fp32 than in bf16
      q = q.to(torch::kFloat);
      keys = keys.to(torch::kFloat);
      values = values.to(torch::kFloat);
    }
    if (prefix == 0) {
      auto attended = at::scaled_dot_product_attention(q, keys, values, c10::nullopt, 0.0, /*is_causal=*/true,
                                                       scale, /*enable_gqa=*/true);
      out.slice(0, begin, end).copy_(attended.squeeze(0).transpose(0, 1));
      continue;
    }
    // Over a cached prefix the causal mask is aligned bottom-right (row i sees keys 0 .. prefix + i)
    // and must be explicit: rows go through in blocks so that no mask exceeds kMaskElements (a 4K
    // chunk over a 128K prefix would otherwise build a 512 MiB mask, and ATen a float copy of it).
    const int64_t rows_per_block = std::max<int64_t>(1, kMaskElements / ctx);
    for (int64_t first = 0; first < q_len; first += rows_per_block) {
      const int64_t last = std::min(q_len, first + rows_per_block);
      const int64_t visible = prefix + last;  // keys the block's last row sees
      auto rows = torch::arange(first, last, lens.options()).unsqueeze(1);
      auto cols = torch::arange(visible, lens.options()).unsqueeze(0);
      auto attended = at::scaled_dot_product_attention(
          q.slice(2, first, last), keys.slice(2, 0, visible), values.slice(2, 0, visible), cols <= rows + prefix,
          0.0, /*is_causal=*/false, scale, /*enable_gqa=*/true);
      out.slice(0, begin + first, begin + last).copy_(attended.squeeze(0).transpose(0, 1));
    }
  }
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm (CPU)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x, then RMSNorm (CPU)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up on [T, 2I] (CPU)");
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("paged_prefill_attention", &paged_prefill_attention, "paged prefill attention, varlen (CPU)");
}
