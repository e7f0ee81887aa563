"""Engine throughput: Ponder's continuous batching vs Hugging Face `generate()`, same run, same prompts.

64 requests with prompts of 16-512 tokens (fixed seed), 128 greedy output tokens each, SmolLM2-135M
on the CPU, both sides in the same dtype (fp32 by default, where both produce identical tokens;
--dtype bfloat16 for the faster CPU serving dtype). Ponder takes all requests at once; transformers runs them in
static batches of 8, left-padded, in arrival order. Both sides produce exactly 128 tokens per
request (EOS is ignored); the script reports how many requests got identical tokens on both sides
(all of them in fp32; in bf16 rounding differences make long greedy continuations drift apart).

    python benchmarks/engine_throughput.py [--dtype float32|bfloat16] [--requests 64] [--json out.json]
    python benchmarks/engine_throughput.py --model tiny-moe   # the MoE + MLA path (DeepSeek-V3 layout)
    python benchmarks/engine_throughput.py --model tiny-moe --speculative [K]   # MTP drafts vs none

`--speculative K` (default 1) runs Ponder twice in the same run, without and with K MTP drafts per
step, instead of transformers: it reports both rates, their ratio, the drafts' acceptance rate and
whether the greedy tokens are identical (they must be).

`tiny-moe` is a random DeepSeek-V3 checkpoint defined here (hidden 512, 6 layers with 1 dense,
64 routed experts top-6 in 8 groups (top-4 groups), 1 shared expert, MLA with q_lora 192 and
kv_lora 128) with one MTP layer, registered with engine.tiny and written once into the model
cache. Its layer outputs are scaled by 0.1 and its MTP layer is a bigram drafter (ponder/engine/tools/tiny
weights.py deepseek_weights), so a fair share of drafts is accepted: a random MTP layer's never are.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

BENCH_MODELS = {
    "tiny-moe": {
        "config": {
            "hidden_size": 512,
            "intermediate_size": 1024,
            "moe_intermediate_size": 256,
            "num_hidden_layers": 6,
            "first_k_dense_replace": 1,
            "num_attention_heads": 8,
            "q_lora_rank": 192,
            "kv_lora_rank": 128,
            "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "n_group": 8,
            "topk_group": 4,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "max_position_embeddings": 4096,
            "num_nextn_predict_layers": 1,
        },
        "branch_gain": 0.1,
        "bigram_mtp": True,
        "seed": 4242,
        "shards": 2,
    }
}


def bench_model_path(name: str):
    """The benchmark's own random DeepSeek-V3 checkpoint, made once into the model cache."""
    from ponder.engine.model_store import model_dir
    from ponder.engine.tools.tiny import BYTE_TOKENIZER, deepseek_config, is_current, make_tiny, register_spec

    spec = BENCH_MODELS[name]
    register_spec(name, {**BYTE_TOKENIZER, **spec, "config": deepseek_config(**spec["config"])})
    directory = model_dir() / name
    if not is_current(name, directory):
        make_tiny(name, directory)
    return directory


def make_prompts(num: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (num,), generator=gen).tolist()
    # Ordinary tokens only (ids below 17 are SmolLM2's control tokens).
    return [torch.randint(17, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_ponder(
    model: str,
    prompts: list[list[int]],
    output_tokens: int,
    max_num_seqs: int,
    dtype: str,
    speculative: int = 0,
    logprobs: int | None = None,
):
    """-> (token ids per prompt, seconds, drafts' acceptance rate)."""
    from ponder.engine import SamplingParams
    from ponder.engine.runtime import LLM

    # Room for every request at full length: the benchmark measures batching, not preemption.
    llm = LLM(
        model, dtype=dtype, max_num_seqs=max_num_seqs, kv_cache_memory=2 << 30, num_speculative_tokens=speculative
    )
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True, logprobs=logprobs)
    llm.generate(prompts[0][:16], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    before = llm.engine.snapshot()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    after = llm.engine.snapshot()
    drafted = after.draft_tokens - before.draft_tokens
    acceptance = (after.accepted_tokens - before.accepted_tokens) / drafted if drafted else 0.0
    llm.close()
    return [o.token_ids for o in outputs], elapsed, acceptance


def load_hf(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@torch.inference_mode()
def run_hf(path, prompts: list[list[int]], output_tokens: int, batch_size: int, pad_id: int, dtype: str):
    model = load_hf(path, getattr(torch, dtype)).eval()
    model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
    results = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=output_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
        results += out[:, width:].tolist()
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--speculative", type=int, nargs="?", const=1, default=0, metavar="K", help="MTP drafts per step vs none"
    )
    parser.add_argument("--logprobs", type=int, metavar="K", help="top-K log probabilities on every token vs none")
    args = parser.parse_args()

    from ponder.engine.config import ModelConfig
    from ponder.engine.model_store import resolve_model

    path = bench_model_path(args.model) if args.model in BENCH_MODELS else resolve_model(args.model)
    vocab = ModelConfig.from_pretrained(path).vocab_size
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed)
    generated = args.requests * args.output_tokens
    prompt_tokens = sum(map(len, prompts))
    print(
        f"{args.requests} requests, {prompt_tokens} prompt tokens, {generated} output tokens, "
        f"{torch.get_num_threads()} threads"
    )

    ponder_tokens, ponder_s, _ = run_ponder(str(path), prompts, args.output_tokens, args.requests, args.dtype)
    print(f"ponder: {ponder_s:.1f} s, {generated / ponder_s:.1f} output tok/s")
    if args.speculative:
        report_speculative(args, path, prompts, generated, ponder_tokens, ponder_s)
        return
    if args.logprobs is not None:
        report_logprobs(args, path, prompts, generated, ponder_tokens, ponder_s)
        return
    hf_tokens, hf_s = run_hf(path, prompts, args.output_tokens, args.hf_batch, 0, args.dtype)
    print(f"hf generate (batch {args.hf_batch}): {hf_s:.1f} s, {generated / hf_s:.1f} output tok/s")

    same = sum(a == b for a, b in zip(ponder_tokens, hf_tokens, strict=True))
    print(f"identical greedy outputs: {same}/{args.requests}")
    figures = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": generated,
        "ponder_s": round(ponder_s, 2),
        "hf_s": round(hf_s, 2),
        "ponder_tok_s": round(generated / ponder_s, 1),
        "hf_tok_s": round(generated / hf_s, 1),
        "ratio": round(hf_s / ponder_s, 2),
        "identical": same,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print(
        f"RESULT engine_throughput model={args.model} dtype={args.dtype} ponder_tok_s={figures['ponder_tok_s']} "
        f"hf_tok_s={figures['hf_tok_s']} ratio={figures['ratio']}"
    )


def report_speculative(args, path, prompts, generated: int, plain_tokens: list, plain_s: float) -> None:
    """The same requests with K MTP drafts per step: rates, ratio, acceptance, identical tokens."""
    k = args.speculative
    tokens, spec_s, acceptance = run_ponder(str(path), prompts, args.output_tokens, args.requests, args.dtype, k)
    same = sum(a == b for a, b in zip(tokens, plain_tokens, strict=True))
    print(f"ponder + {k} MTP draft(s): {spec_s:.1f} s, {generated / spec_s:.1f} output tok/s")
    print(f"acceptance rate: {acceptance:.3f}; identical greedy outputs: {same}/{args.requests}")
    figures = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "output_tokens": generated,
        "num_speculative_tokens": k,
        "plain_s": round(plain_s, 2),
        "speculative_s": round(spec_s, 2),
        "plain_tok_s": round(generated / plain_s, 1),
        "speculative_tok_s": round(generated / spec_s, 1),
        "ratio": round(plain_s / spec_s, 2),
        "acceptance_rate": round(acceptance, 3),
        "identical": same,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print(
        f"RESULT engine_throughput_speculative model={args.model} k={k} acceptance={figures['acceptance_rate']} "
        f"plain_tok_s={figures['plain_tok_s']} speculative_tok_s={figures['speculative_tok_s']} "
        f"ratio={figures['ratio']} identical={same}/{args.requests}"
    )


def report_logprobs(args, path, prompts, generated: int, plain_tokens: list, plain_s: float) -> None:
    """The same requests with the top-K log probabilities of every generated token: rates and ratio."""
    k = args.logprobs
    tokens, with_s, _ = run_ponder(str(path), prompts, args.output_tokens, args.requests, args.dtype, logprobs=k)
    same = sum(a == b for a, b in zip(tokens, plain_tokens, strict=True))
    print(f"ponder with top-{k} log probabilities: {with_s:.1f} s, {generated / with_s:.1f} output tok/s")
    print(
        f"RESULT engine_throughput_logprobs model={args.model} dtype={args.dtype} k={k} "
        f"plain_tok_s={generated / plain_s:.1f} logprobs_tok_s={generated / with_s:.1f} "
        f"ratio={plain_s / with_s:.2f} identical={same}/{args.requests}"
    )


if __name__ == "__main__":
    main()
