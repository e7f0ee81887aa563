"""Triton kernels at DeepSeek-R1 shapes: checked against ponder/kernels/reference.py, then timed next to the
ceilings measured in the same run, then one decode step of a 2-layer R1 slice (issue 7).

    python benchmarks/kernels_gpu.py              # on the GPU machine (full R1 shapes, ~60 GB of memory)
    python benchmarks/kernels_gpu.py --smoke      # end to end on CPU under TRITON_INTERPRET=1, toy shapes
    python benchmarks/kernels_gpu.py --only mla_decode,fused_moe --graphs   # a subset; CUDA-graph step times

Ceilings: device-to-device copy bandwidth (a 1 GiB tensor copy: read + write bytes per second) and
the bf16 matmul rate (8192^3 torch.matmul). Every kernel row gives achieved GB/s (bytes it must
move at least) or TFLOP/s and its percentage of the matching ceiling. Timing: CUDA events around
each call after warm-up, median of the repeats (time.perf_counter on CPU).

Kernels (R1 shapes: hidden 7168, 128 heads, latent 512 + rope 64, 256 experts top-8 in 8 groups
(top-4 groups), moe width 2048, block size 64):
- fp8_quant, fp8_gemm: the projections of an R1 layer (fused q_a|kv_a, q_b, o_proj, shared down)
  at T = 1, 128, 4096; fp8_gemm is also timed against torch.matmul on the bf16 dequantised weight.
- kv_store: 4096 tokens into the MHA/GQA cache (8 kv heads x 128) and the MLA latent cache (576).
- paged_decode (GQA): R1-Distill-Llama-70B's 64 query / 8 kv heads x 128, batch 64 x 8K.
- mla_decode: 128 heads, 576/512, batch 64 x 8K context. Target: >= 60% of the copy bandwidth.
- prefill: 64 / 8 heads x 128, 4 sequences of 1K new tokens over 1K..2K cached tokens.
- mla_prefill: absorbed MLA prefill, 128 heads, 576/512, the same sequences (the path taken for
  prompts over a cached prefix; fresh prompts expand per-head K/V and use torch SDPA).
- grouped_topk: 256 experts, batch 128. fused_moe: bf16 and FP8 experts at batch 1, 32, 128, against
  the reference (FP8 also against the per-expert loop over the Triton FP8 GEMM); target: >= 2x the
  reference at batch 128.

decode_step: the kernels composed directly (not ponder/engine/runtime/models/deepseek_v3.py, whose Linear holds
unquantised weights): per layer RMSNorm -> fused q_a|kv_a FP8 GEMM -> q_a norm -> q_b FP8 GEMM ->
latent norm -> KV store -> W_UK absorption (bf16 bmm) -> paged MLA decode -> W_UV (bf16 bmm) ->
o_proj FP8 GEMM -> RMSNorm -> router (fp32 linear + sigmoid) -> grouped top-k -> fused MoE (FP8
routed experts, R1's format) + shared expert (two FP8 GEMMs). RoPE is left out (elementwise on 64
dims). Two such layers at full width with random weights, batch 1/32/128 at 4K and 32K contexts; the projection
for all 61 layers is 61 x (step / 2) plus the bf16 lm_head GEMM (the 3 dense layers are counted
as MoE layers), i.e. a single GPU holding the whole model, which R1 (671B) does not fit.

The last lines are `RESULT kernel=NAME key=value ...` rows; the exit code is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# kernel name -> (module under kernels.triton_kernels, launcher function)
KERNELS: dict[str, tuple[str, str]] = {
    "fp8_quant": ("fp8_gemm", "per_token_group_quant_fp8"),
    "fp8_gemm": ("fp8_gemm", "fp8_block_gemm"),
    "kv_store": ("kv_store", "store_kvcache"),
    "kv_store_latent": ("kv_store", "store_latent_cache"),
    "paged_decode": ("paged_decode", "paged_decode_attention"),
    "mla_decode": ("mla_decode", "paged_mla_decode"),
    "prefill": ("prefill", "paged_prefill_attention"),
    "mla_prefill": ("prefill", "paged_mla_prefill"),
    "grouped_topk": ("topk_router", "grouped_topk"),
    "fused_moe": ("fused_moe", "fused_moe"),
}


@dataclass
class Dims:
    """Model and benchmark shapes: R1 at full size, or toy ones for --smoke."""

    hidden: int = 7168
    heads: int = 128
    q_lora: int = 1536
    kv_lora: int = 512
    rope: int = 64
    nope: int = 128
    v_dim: int = 128
    experts: int = 256
    top_k: int = 8
    groups: int = 8
    topk_groups: int = 4
    moe_width: int = 2048
    n_shared: int = 1
    vocab: int = 129280
    block_size: int = 64
    layers: int = 61
    gqa: tuple[int, int, int] = (64, 8, 128)  # query heads, kv heads, head dim (R1-Distill-Llama-70B)
    gemm_tokens: tuple[int, ...] = (1, 128, 4096)
    store_tokens: int = 4096
    decode_batch: int = 64
    decode_context: int = 8192
    prefill: tuple[int, int, int] = (4, 1024, 2048)  # sequences, new tokens, max context
    moe_batches: tuple[int, ...] = (1, 32, 128)
    step_batches: tuple[int, ...] = (1, 32, 128)
    step_contexts: tuple[int, ...] = (4096, 32768)
    copy_bytes: int = 1 << 30
    matmul_n: int = 8192
    warmup: int = 3
    repeats: int = 20

    @property
    def scale(self) -> float:
        """R1's softmax scale: qk_head_dim^-0.5 * mscale^2 (YaRN factor 40, mscale_all_dim 1)."""
        mscale = 0.1 * 1.0 * math.log(40) + 1.0
        return (self.nope + self.rope) ** -0.5 * mscale * mscale


SMOKE = Dims(
    hidden=256, heads=4, q_lora=128, kv_lora=64, rope=32, nope=32, v_dim=32, experts=8, top_k=2, groups=4,
    topk_groups=2, moe_width=128, vocab=512, block_size=16, gqa=(4, 2, 32), gemm_tokens=(1, 5),
    store_tokens=10, decode_batch=3, decode_context=40, prefill=(2, 9, 30), moe_batches=(1, 4),
    step_batches=(1, 2), step_contexts=(20, 40), copy_bytes=4 << 20, matmul_n=256, warmup=0, repeats=1,
)  # fmt: skip


class Bench:
    def __init__(self, dims: Dims, device, dtype, smoke: bool) -> None:
        import torch

        self.torch = torch
        self.dims, self.device, self.dtype, self.smoke = dims, device, dtype, smoke
        self.results: list[dict] = []
        self.failed = False
        self.copy_gbps = 0.0
        self.matmul_tflops = 0.0
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.graphs = False

    # ---- helpers -------------------------------------------------------------------------------

    def launcher(self, name: str) -> Callable:
        module, function = KERNELS[name]
        return getattr(importlib.import_module(f"ponder.kernels.triton_kernels.{module}"), function)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def timeit(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        """Median milliseconds of fn() after warm-up."""
        torch = self.torch
        repeats = repeats or self.dims.repeats
        for _ in range(self.dims.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def randn(self, *shape, dtype=None, scale: float = 1.0):
        # drawn in the target dtype: no fp32 temporary of R1's 15 GB expert stacks
        out = self.torch.randn(*shape, generator=self.gen, device=self.device, dtype=dtype or self.dtype)
        return out.mul_(scale) if scale != 1.0 else out

    def record(self, kernel: str, **fields) -> dict:
        row = {"kernel": kernel, **fields}
        self.results.append(row)
        if row.get("status") == "fail":
            self.failed = True
        print("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        return row

    def with_ceilings(self, row: dict, ms: float, nbytes: float | None = None, flops: float | None = None) -> dict:
        row["ms"] = ms
        if nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(gbps=gbps, copy_gbps=self.copy_gbps, pct_copy=100 * gbps / self.copy_gbps)
        if flops is not None:
            tflops = flops / (ms * 1e-3) / 1e12
            row.update(tflops=tflops, bf16_tflops=self.matmul_tflops, pct_bf16=100 * tflops / self.matmul_tflops)
        return row

    def guarded(self, kernel: str, body: Callable[[Callable], None], **labels) -> None:
        """Run one kernel's checks; an exception (an import error too) becomes a failed RESULT row."""
        print(f"== {kernel} {' '.join(labels.values())}", flush=True)
        try:
            body(self.launcher(kernel))
        except Exception as error:
            traceback.print_exc()
            self.record(kernel, status="fail", **labels, error=_one_line(error))
        finally:
            gc.collect()
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()

    # ---- ceilings ------------------------------------------------------------------------------

    def ceilings(self) -> None:
        torch = self.torch
        src = torch.empty(self.dims.copy_bytes // 2, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        ms = self.timeit(lambda: dst.copy_(src))
        self.copy_gbps = 2 * self.dims.copy_bytes / (ms * 1e-3) / 1e9
        n = self.dims.matmul_n
        a, b = self.randn(n, n, dtype=torch.bfloat16), self.randn(n, n, dtype=torch.bfloat16)
        ms = self.timeit(lambda: torch.matmul(a, b))
        self.matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
        print(f"CEILING copy_gbps={self.copy_gbps:.1f} bf16_matmul_tflops={self.matmul_tflops:.2f}", flush=True)

    # ---- kernels -------------------------------------------------------------------------------

    def check_fp8(self) -> None:
        from ponder.engine.runtime.fp8 import dequantize_block_fp8
        from ponder.kernels import reference

        torch, d = self.torch, self.dims
        projections = {
            "qkv_a": (d.q_lora + d.kv_lora + d.rope, d.hidden),
            "q_b": (d.heads * (d.nope + d.rope), d.q_lora),
            "o_proj": (d.hidden, d.heads * d.v_dim),
            "shared_down": (d.hidden, d.moe_width * d.n_shared),
        }
        weights = {}
        for tag, (n, k) in projections.items():
            weights[tag] = self.fp8_weight(n, k)

        def quant(launcher):
            for tokens in d.gemm_tokens:
                x = self.randn(tokens, d.hidden)
                q, s = launcher(x)
                ref_q, ref_s = reference.per_token_group_quant_fp8(x)
                # GPU fp32 division may round differently from torch's at an fp8 rounding boundary
                mismatch = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
                scale_err = ((s - ref_s).abs() / ref_s).max().item()
                ok = mismatch <= 1e-3 and scale_err <= 1e-6
                row = {"status": "ok" if ok else "fail", "shape": f"T{tokens}xK{d.hidden}"}
                row.update(mismatch=mismatch, scale_err=scale_err)
                nbytes = x.numel() * x.element_size() + q.numel() + s.numel() * 4
                self.record("fp8_quant", **self.with_ceilings(row, self.timeit(lambda x=x: launcher(x)), nbytes))

        def gemm(launcher):
            from ponder.kernels.triton_kernels.fp8_gemm import per_token_group_quant_fp8

            for tag, (w_q, w_s) in weights.items():
                n, k = w_q.shape
                dequant = dequantize_block_fp8(w_q, w_s, 128, self.dtype)
                for tokens in d.gemm_tokens:
                    x = self.randn(tokens, k)
                    x_q, x_s = per_token_group_quant_fp8(x)
                    out = launcher(x_q, x_s, w_q, w_s, self.dtype)
                    expected = reference.fp8_block_gemm(x_q, x_s, w_q, w_s, torch.float32)
                    err = _rel_err(out, expected)
                    tol = 1e-3 if self.dtype == torch.float32 else 1e-2
                    row = {"status": "ok" if err <= tol else "fail", "shape": f"{tag}:T{tokens}xN{n}xK{k}"}
                    row.update(err=err, tol=tol)
                    ms = self.timeit(lambda a=x_q, s=x_s, w=w_q, ws=w_s: launcher(a, s, w, ws, self.dtype))
                    nbytes = w_q.numel() + x_q.numel() + tokens * n * out.element_size()
                    self.with_ceilings(row, ms, nbytes, 2.0 * tokens * n * k)
                    row["matmul_ms"] = self.timeit(lambda x=x, w=dequant: torch.matmul(x, w.t()))
                    row["vs_matmul"] = row["matmul_ms"] / ms
                    self.record("fp8_gemm", **row)

        self.guarded("fp8_quant", quant)
        self.guarded("fp8_gemm", gemm)

    def check_kv_store(self) -> None:
        from ponder.kernels import reference

        torch, d = self.torch, self.dims
        heads, kv_heads, head_dim = d.gqa
        tokens, block = d.store_tokens, d.block_size
        num_blocks = 2 * -(-tokens // block)
        # distinct slots, a few skipped (-1)
        slots = torch.randperm(num_blocks * block, generator=self.gen, device=self.device)[:tokens]
        slots[:: max(1, tokens // 5)] = -1

        def poisoned(*shape):
            return torch.full(shape, float("nan"), dtype=self.dtype, device=self.device)

        def mha(launcher):
            key, value = self.randn(tokens, kv_heads, head_dim), self.randn(tokens, kv_heads, head_dim)
            k_cache, v_cache = (
                poisoned(num_blocks, block, kv_heads, head_dim),
                poisoned(num_blocks, block, kv_heads, head_dim),
            )
            ref_k, ref_v = k_cache.clone(), v_cache.clone()
            launcher(key, value, k_cache, v_cache, slots)
            reference.store_kvcache(key, value, ref_k, ref_v, slots)
            same = _bits_equal(k_cache, ref_k) and _bits_equal(v_cache, ref_v)
            row = {"status": "ok" if same else "fail", "variant": "mha", "shape": f"T{tokens}xK{kv_heads}xD{head_dim}"}
            ms = self.timeit(lambda: launcher(key, value, k_cache, v_cache, slots))
            self.record("kv_store", **self.with_ceilings(row, ms, 2 * 2 * key.numel() * key.element_size()))

        def latent(_):  # the same module's other launcher, reported under kv_store
            launcher = self.launcher("kv_store_latent")
            width = d.kv_lora + d.rope
            lat = self.randn(tokens, width)
            cache = poisoned(num_blocks, block, width)
            ref = cache.clone()
            launcher(lat, cache, slots)
            reference.store_latent_cache(lat, ref, slots)
            row = {
                "status": "ok" if _bits_equal(cache, ref) else "fail",
                "variant": "mla",
                "shape": f"T{tokens}xW{width}",
            }
            ms = self.timeit(lambda: launcher(lat, cache, slots))
            self.record("kv_store", **self.with_ceilings(row, ms, 2 * lat.numel() * lat.element_size()))

        self.guarded("kv_store", mha, variant="mha")
        self.guarded("kv_store", latent, variant="mla")

    def paged_inputs(self, batch: int, context: int, ragged: bool):
        """Block tables over a shuffled pool and context lengths in (context/2, context]."""
        torch, block = self.torch, self.dims.block_size
        per_seq = -(-context // block)
        pool = torch.randperm(batch * per_seq, generator=self.gen, device=self.device)
        tables = pool.view(batch, per_seq)
        if ragged:
            lens = torch.randint(context // 2 + 1, context + 1, (batch,), generator=self.gen, device=self.device)
            lens[0] = context  # one at the full width
        else:
            lens = torch.full((batch,), context, device=self.device)
        return tables, lens, batch * per_seq

    def check_paged_decode(self) -> None:
        from ponder.kernels import reference

        d = self.dims
        heads, kv_heads, head_dim = d.gqa
        batch, context = d.decode_batch, d.decode_context

        def body(launcher):
            tables, lens, num_blocks = self.paged_inputs(batch, context, ragged=True)
            k_cache = self.randn(num_blocks, d.block_size, kv_heads, head_dim)
            v_cache = self.randn(num_blocks, d.block_size, kv_heads, head_dim)
            query = self.randn(batch, heads, head_dim)
            scale = head_dim**-0.5
            out = launcher(query, k_cache, v_cache, tables, lens, scale)
            err = _rel_err(out, reference.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale))
            tol = self.tol()
            row = {
                "status": "ok" if err <= tol else "fail",
                "shape": f"B{batch}xL{context}xH{heads}/{kv_heads}xD{head_dim}",
            }
            row.update(err=err, tol=tol)
            ms = self.timeit(lambda: launcher(query, k_cache, v_cache, tables, lens, scale))
            nbytes = 2 * int(lens.sum()) * kv_heads * head_dim * k_cache.element_size()
            self.record("paged_decode", **self.with_ceilings(row, ms, nbytes))

        self.guarded("paged_decode", body)

    def check_mla_decode(self) -> None:
        from ponder.kernels import reference

        d = self.dims
        batch, context, width = d.decode_batch, d.decode_context, d.kv_lora + d.rope

        def body(launcher):
            tables, lens, num_blocks = self.paged_inputs(batch, context, ragged=True)
            cache = self.randn(num_blocks, d.block_size, width)
            query = self.randn(batch, d.heads, width)
            out = launcher(query, cache, tables, lens, d.kv_lora, d.scale)
            err = _rel_err(out, reference.paged_mla_decode(query, cache, tables, lens, d.kv_lora, d.scale))
            tol = self.tol()
            row = {"status": "ok" if err <= tol else "fail", "shape": f"B{batch}xL{context}xH{d.heads}xW{width}"}
            row.update(err=err, tol=tol)
            # timed at the full context: the target is stated for batch 64 x 8K
            full_tables, full_lens, _ = self.paged_inputs(batch, context, ragged=False)
            ms = self.timeit(lambda: launcher(query, cache, full_tables, full_lens, d.kv_lora, d.scale))
            nbytes = batch * context * width * cache.element_size()
            self.with_ceilings(row, ms, nbytes)
            row.update(target_pct_copy=60, met="yes" if row["pct_copy"] >= 60 else "no")
            self.record("mla_decode", **row)

        self.guarded("mla_decode", body)

    def check_prefill(self) -> None:
        from ponder.kernels import reference

        d = self.dims
        heads, kv_heads, head_dim = d.gqa
        seqs, new_tokens, max_context = d.prefill

        def body(launcher):
            tables, starts, lens, max_query_len, num_blocks, visible = self.prefill_inputs()
            k_cache = self.randn(num_blocks, d.block_size, kv_heads, head_dim)
            v_cache = self.randn(num_blocks, d.block_size, kv_heads, head_dim)
            query = self.randn(int(starts[-1]), heads, head_dim)
            args = (query, k_cache, v_cache, tables, starts, lens, max_query_len, head_dim**-0.5)
            err = _rel_err(launcher(*args), reference.paged_prefill_attention(*args))
            tol = self.tol()
            row = {
                "status": "ok" if err <= tol else "fail",
                "shape": f"S{seqs}xQ{new_tokens}xL{max_context}xH{heads}/{kv_heads}",
            }
            row.update(err=err, tol=tol)
            flops = 4.0 * heads * head_dim * visible
            self.record("prefill", **self.with_ceilings(row, self.timeit(lambda: launcher(*args)), flops=flops))

        self.guarded("prefill", body)

    def prefill_inputs(self):
        """Sequences of up to `new_tokens` new tokens (one at the full count) over random cached
        prefixes: block tables, query start offsets, context lengths, and the causal pair count."""
        torch, d = self.torch, self.dims
        seqs, new_tokens, max_context = d.prefill
        query_lens = torch.randint(1, new_tokens + 1, (seqs,), generator=self.gen, device=self.device)
        query_lens[0] = new_tokens
        prefix = torch.randint(0, max_context - new_tokens + 1, (seqs,), generator=self.gen, device=self.device)
        tables, _, num_blocks = self.paged_inputs(seqs, max_context, ragged=False)
        starts = torch.zeros(seqs + 1, dtype=torch.int64, device=self.device)
        starts[1:] = query_lens.cumsum(0)
        # causal: query row i of a sequence sees prefix + i + 1 keys
        visible = sum(int(q) * int(p) + int(q) * (int(q) + 1) // 2 for q, p in zip(query_lens, prefix, strict=True))
        return tables, starts, prefix + query_lens, int(query_lens.max()), num_blocks, visible

    def check_mla_prefill(self) -> None:
        from ponder.kernels import reference

        d = self.dims
        seqs, new_tokens, max_context = d.prefill
        width = d.kv_lora + d.rope

        def body(launcher):
            tables, starts, lens, max_query_len, num_blocks, visible = self.prefill_inputs()
            cache = self.randn(num_blocks, d.block_size, width)
            query = self.randn(int(starts[-1]), d.heads, width)
            args = (query, cache, tables, starts, lens, max_query_len, d.kv_lora, d.scale)
            err = _rel_err(launcher(*args), reference.paged_mla_prefill(*args))
            tol = self.tol()
            row = {
                "status": "ok" if err <= tol else "fail",
                "shape": f"S{seqs}xQ{new_tokens}xL{max_context}xH{d.heads}xW{width}",
            }
            row.update(err=err, tol=tol)
            flops = 2.0 * d.heads * (width + d.kv_lora) * visible  # q.k over C + R, p.v over C
            self.with_ceilings(row, self.timeit(lambda: launcher(*args)), flops=flops)
            row["ref_ms"] = self.timeit(lambda: reference.paged_mla_prefill(*args))
            row["speedup"] = row["ref_ms"] / row["ms"]
            self.record("mla_prefill", **row)

        self.guarded("mla_prefill", body)

    def router_inputs(self, tokens: int):
        torch, d = self.torch, self.dims
        scores = self.randn(tokens, d.experts, dtype=torch.float32).sigmoid()
        bias = self.randn(d.experts, dtype=torch.float32, scale=0.1)
        return scores, bias

    def check_grouped_topk(self) -> None:
        from ponder.kernels import reference

        torch, d = self.torch, self.dims
        tokens = max(d.moe_batches)

        def body(launcher):
            scores, bias = self.router_inputs(tokens)
            args = (scores, bias, d.top_k, d.groups, d.topk_groups, True, 2.5)
            weights, ids = launcher(*args)
            ref_weights, ref_ids = reference.grouped_topk(*args)
            order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
            same_ids = torch.equal(ids.gather(1, order).long(), ref_ids.gather(1, ref_order).long())
            err = (weights.gather(1, order) - ref_weights.gather(1, ref_order)).abs().max().item()
            ok = same_ids and err <= 1e-5
            row = {
                "status": "ok" if ok else "fail",
                "shape": f"T{tokens}xX{d.experts}",
                "same_ids": same_ids,
                "err": err,
            }
            ms = self.timeit(lambda: launcher(*args))
            row["ref_ms"] = self.timeit(lambda: reference.grouped_topk(*args))
            row["speedup"] = row["ref_ms"] / ms
            self.record("grouped_topk", **self.with_ceilings(row, ms))

        self.guarded("grouped_topk", body)

    def fp8_weight(self, rows: int, cols: int):
        """A random [rows, cols] weight quantised as R1's checkpoints are: (fp8, 128x128 block scales)."""
        from ponder.engine.runtime.fp8 import quantize_block_fp8

        return quantize_block_fp8(self.randn(rows, cols, dtype=self.torch.float32, scale=cols**-0.5))

    def fp8_experts(self, experts: int, rows: int, cols: int):
        """Random FP8 expert stacks in R1's format: e4m3 weights [X, rows, cols] and fp32 scales per
        128x128 block [X, ceil(rows/128), ceil(cols/128)] around cols^-0.5 (one bf16 expert at a time)."""
        torch = self.torch
        weight = torch.empty(experts, rows, cols, dtype=torch.float8_e4m3fn, device=self.device)
        for expert in range(experts):
            weight[expert] = self.randn(rows, cols, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        blocks = (experts, -(-rows // 128), -(-cols // 128))
        scale = torch.rand(blocks, generator=self.gen, device=self.device).add_(0.5).mul_(cols**-0.5)
        return weight, scale

    def check_fused_moe(self) -> None:
        """bf16 experts against reference.fused_moe; FP8 experts (R1's format) against
        reference.fused_moe_fp8, and timed also against the per-expert loop over the Triton FP8 GEMM."""
        from ponder.kernels import reference
        from ponder.kernels.triton_kernels.fp8_gemm import fp8_linear

        torch, d = self.torch, self.dims

        def run(variant: str, fused: Callable, ref: Callable, loop: Callable | None, weight_bytes: int) -> None:
            """fused / ref / loop: (x, topk weights, topk ids) -> [T, E]."""
            for tokens in d.moe_batches:
                x = self.randn(tokens, d.hidden)
                scores, bias = self.router_inputs(tokens)
                weights, ids = reference.grouped_topk(scores, bias, d.top_k, d.groups, d.topk_groups, True, 2.5)
                args = (x, weights, ids)
                err = _rel_err(fused(*args), ref(*args))
                tol = self.tol()
                row = {
                    "status": "ok" if err <= tol else "fail",
                    "variant": variant,
                    "shape": f"T{tokens}xX{d.experts}k{d.top_k}xE{d.hidden}xI{d.moe_width}",
                }
                row.update(err=err, tol=tol)
                used = int(torch.unique(ids).numel())
                nbytes = used * 3 * d.moe_width * d.hidden * weight_bytes  # the used experts' weights
                flops = 2.0 * tokens * d.top_k * 3 * d.moe_width * d.hidden
                ms = self.timeit(lambda args=args: fused(*args))
                self.with_ceilings(row, ms, nbytes, flops)
                row["ref_ms"] = self.timeit(lambda args=args: ref(*args))
                row["speedup"] = row["ref_ms"] / ms
                if loop is not None:  # what the engine ran before the fused FP8 kernel
                    row["loop_ms"] = self.timeit(lambda args=args: loop(*args))
                    row["vs_loop"] = row["loop_ms"] / ms
                if tokens == max(d.moe_batches):
                    row.update(target_speedup=2, met="yes" if row["speedup"] >= 2 else "no")
                self.record("fused_moe", **row)

        def body(launcher):
            w13 = self.randn(d.experts, 2 * d.moe_width, d.hidden, scale=d.hidden**-0.5)
            w2 = self.randn(d.experts, d.hidden, d.moe_width, scale=d.moe_width**-0.5)
            run(
                "bf16",
                lambda x, w, i: launcher(x, w13, w2, w, i),
                lambda x, w, i: reference.fused_moe(x, w13, w2, w, i),
                None,
                w13.element_size(),
            )
            del w13, w2
            w13, w13_s = self.fp8_experts(d.experts, 2 * d.moe_width, d.hidden)
            w2, w2_s = self.fp8_experts(d.experts, d.hidden, d.moe_width)
            run(
                "fp8",
                lambda x, w, i: launcher(x, w13, w2, w, i, w13_s, w2_s),
                lambda x, w, i: reference.fused_moe_fp8(x, w13, w13_s, w2, w2_s, w, i),
                lambda x, w, i: reference.fused_moe_fp8(x, w13, w13_s, w2, w2_s, w, i, fp8_linear),
                1,
            )

        self.guarded("fused_moe", body)

    def tol(self) -> float:
        """Attention and MoE outputs, max error relative to the output's max: fp32 (interpreter,
        CPU) 1e-3; bf16 on the GPU 3e-2 (bf16 operands, different summation orders)."""
        return 1e-3 if self.dtype == self.torch.float32 else 3e-2

    # ---- the 2-layer decode step ---------------------------------------------------------------

    def decode_step(self) -> None:
        print("== decode_step", flush=True)
        try:
            self._decode_step()
        except Exception as error:
            traceback.print_exc()
            self.record("decode_step", status="fail", error=_one_line(error))

    def _decode_step(self) -> None:
        from ponder.kernels import reference
        from ponder.kernels.triton_kernels.fp8_gemm import fp8_linear

        torch, F, d = self.torch, self.torch.nn.functional, self.dims
        ops = {name: self.launcher(name) for name in ("kv_store_latent", "mla_decode", "grouped_topk", "fused_moe")}
        width = d.kv_lora + d.rope
        max_batch, max_context = max(d.step_batches), max(d.step_contexts)
        per_seq = -(-max_context // d.block_size)

        layers = []
        for _ in range(2):
            w_kv = self.randn(d.heads, d.nope + d.v_dim, d.kv_lora, scale=d.kv_lora**-0.5)
            layers.append(
                {
                    "ln1": torch.ones(d.hidden, dtype=self.dtype, device=self.device),
                    "ln2": torch.ones(d.hidden, dtype=self.dtype, device=self.device),
                    "q_ln": torch.ones(d.q_lora, dtype=self.dtype, device=self.device),
                    "kv_ln": torch.ones(d.kv_lora, dtype=self.dtype, device=self.device),
                    "qkv_a": self.fp8_weight(d.q_lora + width, d.hidden),
                    "q_b": self.fp8_weight(d.heads * (d.nope + d.rope), d.q_lora),
                    "o": self.fp8_weight(d.hidden, d.heads * d.v_dim),
                    "w_uk": w_kv[:, : d.nope].contiguous(),  # [H, Dn, C]
                    "w_uv": w_kv[:, d.nope :].transpose(1, 2).contiguous(),  # [H, C, Dv]
                    "gate": self.randn(d.experts, d.hidden, dtype=torch.float32, scale=d.hidden**-0.5),
                    "bias": self.randn(d.experts, dtype=torch.float32, scale=0.01),
                    "w13": self.fp8_experts(d.experts, 2 * d.moe_width, d.hidden),
                    "w2": self.fp8_experts(d.experts, d.hidden, d.moe_width),
                    "sh13": self.fp8_weight(2 * d.moe_width * d.n_shared, d.hidden),
                    "sh2": self.fp8_weight(d.hidden, d.moe_width * d.n_shared),
                    "cache": self.randn(max_batch * per_seq, d.block_size, width),
                }
            )
        lm_head = self.randn(d.vocab, d.hidden, scale=d.hidden**-0.5)

        def layer(p: dict, h, tables, lens, slots):
            batch = h.shape[0]
            x = reference.rms_norm(h, p["ln1"], 1e-6)
            qkv_a = fp8_linear(x, *p["qkv_a"])  # [B, q_lora + C + R]
            q_a, kv_a = qkv_a.split([d.q_lora, width], dim=-1)
            q = fp8_linear(reference.rms_norm(q_a.contiguous(), p["q_ln"], 1e-6), *p["q_b"])
            q_nope, q_pe = q.view(batch, d.heads, d.nope + d.rope).split([d.nope, d.rope], dim=-1)
            c_kv, k_pe = kv_a.split([d.kv_lora, d.rope], dim=-1)
            latent = torch.cat([reference.rms_norm(c_kv.contiguous(), p["kv_ln"], 1e-6), k_pe], dim=-1)  # [B, C + R]
            ops["kv_store_latent"](latent, p["cache"], slots)
            q_latent = torch.bmm(q_nope.transpose(0, 1), p["w_uk"]).transpose(0, 1)  # [B, H, C]
            query = torch.cat([q_latent, q_pe], dim=-1).contiguous()  # [B, H, C + R]
            attended = ops["mla_decode"](query, p["cache"], tables, lens, d.kv_lora, d.scale)  # [B, H, C]
            out = torch.bmm(attended.transpose(0, 1), p["w_uv"]).transpose(0, 1)  # [B, H, Dv]
            h = h + fp8_linear(out.reshape(batch, d.heads * d.v_dim), *p["o"])
            x = reference.rms_norm(h, p["ln2"], 1e-6)
            scores = F.linear(x.float(), p["gate"]).sigmoid()  # [B, X]
            weights, ids = ops["grouped_topk"](scores, p["bias"], d.top_k, d.groups, d.topk_groups, True, 2.5)
            (w13, w13_s), (w2, w2_s) = p["w13"], p["w2"]
            routed = ops["fused_moe"](x, w13, w2, weights, ids, w13_s, w2_s)
            shared = fp8_linear(reference.silu_and_mul(fp8_linear(x, *p["sh13"])), *p["sh2"])
            return h + routed + shared

        for context in d.step_contexts:
            for batch in d.step_batches:
                tables = torch.arange(batch * per_seq, device=self.device).view(batch, per_seq)
                tables = tables[:, : -(-context // d.block_size)].contiguous()
                lens = torch.full((batch,), context, dtype=torch.int64, device=self.device)
                slots = tables[:, (context - 1) // d.block_size] * d.block_size + (context - 1) % d.block_size
                h0 = self.randn(batch, d.hidden)

                def step(h0=h0, tables=tables, lens=lens, slots=slots):
                    h = h0
                    for p in layers:
                        h = layer(p, h, tables, lens, slots)
                    return h

                out = step()
                finite = bool(torch.isfinite(out).all())
                ms = self.timeit(step, repeats=d.repeats if self.smoke else max(5, d.repeats // 2))
                graph_ms = self._graph_ms(step) if self.graphs else None
                best = min(ms, graph_ms) if graph_ms is not None else ms
                head_ms = self.timeit(lambda h0=h0: F.linear(h0, lm_head))
                projected_ms = d.layers * best / 2 + head_ms
                row = {
                    "status": "ok" if finite else "fail",
                    "shape": f"B{batch}xL{context}",
                    "layers": 2,
                    "ms": ms,
                    "graph_ms": graph_ms if graph_ms is not None else "n/a",
                    "lm_head_ms": head_ms,
                    "projected_61_layer_ms": projected_ms,
                    "projected_tok_s": batch / (projected_ms * 1e-3),
                    "moe_weights": "fp8",
                }
                self.record("decode_step", **row)

    def _graph_ms(self, step: Callable[[], object]) -> float | None:
        """The step replayed from a CUDA graph (no launch overhead), where it captures (a host sync
        inside a launcher makes capture fail: then only the eager time is reported)."""
        torch = self.torch
        if self.device.type != "cuda":
            return None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            return self.timeit(graph.replay)
        except Exception as error:
            print(f"  (CUDA graph capture failed: {_one_line(error)})", flush=True)
            torch.cuda.synchronize()
            return None


def _rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|; inf where the output has NaN/inf (unwritten)."""
    if not bool(actual.isfinite().all()):
        return float("inf")
    return (actual.float() - expected.float()).abs().max().item() / max(expected.float().abs().max().item(), 1e-12)


def _bits_equal(a, b) -> bool:
    """Equal including the NaN poison in unwritten slots."""
    import torch

    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(torch.equal(a.view(view), b.view(view)))


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or math.isinf(value) or math.isnan(value):
            return str(value)
        if 1e-3 <= abs(value) < 1e3:
            return f"{value:.4g}"
        return f"{value:.1f}" if 1e3 <= abs(value) < 1e9 else f"{value:.3e}"
    return str(value).replace(" ", "_")


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}:{str(error).splitlines()[0] if str(error) else ''}"[:160].replace(" ", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy shapes; on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--graphs", action="store_true", help="also time the decode step replayed from a CUDA graph")
    parser.add_argument("--only", default="", help="comma-separated subset: fp8,kv_store,...,decode_step")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: the full run needs the GPU machine (use --smoke for the CPU toy run)")
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are imported
    dims = SMOKE if args.smoke else Dims()
    device = torch.device("cuda" if cuda else "cpu")
    # the interpreter's tl.dot on bf16 is wrong (docs/architecture.md#triton-interpreter): fp32 there; bf16 on the GPU
    dtype = torch.bfloat16 if cuda else torch.float32
    bench = Bench(dims, device, dtype, args.smoke)
    bench.graphs = args.graphs
    name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    print(f"device={name} smoke={args.smoke} dtype={str(dtype).removeprefix('torch.')}", flush=True)

    bench.ceilings()
    checks = {
        "fp8": bench.check_fp8,
        "kv_store": bench.check_kv_store,
        "paged_decode": bench.check_paged_decode,
        "mla_decode": bench.check_mla_decode,
        "prefill": bench.check_prefill,
        "mla_prefill": bench.check_mla_prefill,
        "grouped_topk": bench.check_grouped_topk,
        "fused_moe": bench.check_fused_moe,
        "decode_step": bench.decode_step,
    }
    selected = args.only.split(",") if args.only else list(checks)
    unknown = sorted(set(selected) - set(checks))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {sorted(checks)}")
    for check in selected:
        checks[check]()

    print()
    print(f"CEILING copy_gbps={bench.copy_gbps:.1f} bf16_matmul_tflops={bench.matmul_tflops:.2f}")
    for row in bench.results:
        print("RESULT " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
