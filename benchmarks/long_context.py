"""Long context on tiny-r1: 16K, 32K, 64K and 128K-token prompts through chunked prefill on the CPU.

Each length runs in a fresh process, so its peak RSS is its own. Reported per length: prefill
tokens/s, time to first token, peak RSS, and the KV bytes the prompt occupies in the paged latent
cache (MLA: layers x (kv_lora_rank + qk_rope_head_dim) values per token). Where transformers can
hold the prompt too (--hf-max, default 16K: at 32K its attention mask and scores no longer fit
this machine's 24 GB) it prefills the same prompt in one forward pass, its
next greedy token is compared, and the ratio of the two prefill speeds is printed.

    python benchmarks/long_context.py [--lengths 16384 32768 65536 131072] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODEL = "tiny-r1"


def make_prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(100, 128_000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_ponder(length: int, chunk: int, dtype: str) -> dict:
    from ponder.engine import SamplingParams
    from ponder.engine.runtime import LLM

    llm = LLM(MODEL, dtype=dtype, max_num_batched_tokens=chunk, max_num_seqs=1)
    prompt = make_prompt(min(length, llm.engine.max_model_len - 1))
    start = time.perf_counter()
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    elapsed = time.perf_counter() - start
    per_token = llm.engine.model_runner.kv_cache_bytes_per_token
    return _figures("ponder", prompt, elapsed, out.token_ids[0], kv_bytes_per_token=per_token)


@torch.inference_mode()
def run_hf(length: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    from ponder.engine.model_store import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=getattr(torch, dtype)).eval()
    prompt = make_prompt(min(length, model.config.max_position_embeddings - 1))
    start = time.perf_counter()
    logits = model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    elapsed = time.perf_counter() - start
    return _figures("hf", prompt, elapsed, int(logits.argmax()))


def _figures(side: str, prompt: list[int], elapsed: float, next_token: int, kv_bytes_per_token: int | None = None):
    """One side's row; the KV bytes the prompt holds where the side has a paged cache."""
    row = {
        "side": side,
        "prompt_tokens": len(prompt),
        "seconds": round(elapsed, 2),
        "prefill_tok_s": round(len(prompt) / elapsed, 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if kv_bytes_per_token is not None:
        row.update(kv_bytes_per_token=kv_bytes_per_token, kv_bytes=kv_bytes_per_token * len(prompt))
    return {**row, "next_token": next_token}


def in_subprocess(side: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--one", side, str(length), "--chunk", str(args.chunk), "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} at {length} tokens failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16_384, 32_768, 65_536, 131_072])
    parser.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens (prefill chunk)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hf-max", type=int, default=16_384, help="longest prompt also run through transformers")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, length = args.one[0], int(args.one[1])
        result = run_ponder(length, args.chunk, args.dtype) if side == "ponder" else run_hf(length, args.dtype)
        print(json.dumps(result))
        return

    print(f"{MODEL}, {args.dtype}, prefill chunk {args.chunk}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>8} {'side':>6} {'seconds':>8} {'tok/s':>8} {'peak RSS GiB':>12} {'KV MiB':>8}")
    rows = []
    for length in args.lengths:
        sides = ["ponder", "hf"] if length <= args.hf_max else ["ponder"]
        results = {side: in_subprocess(side, length, args) for side in sides}
        for result in results.values():
            kv = f"{result['kv_bytes'] / 2**20:8.1f}" if "kv_bytes" in result else f"{'-':>8}"
            print(
                f"{result['prompt_tokens']:>8} {result['side']:>6} {result['seconds']:>8.1f} "
                f"{result['prefill_tok_s']:>8.0f} {result['peak_rss_bytes'] / 2**30:>12.2f} {kv}"
            )
        if "hf" in results:
            ratio = results["ponder"]["prefill_tok_s"] / results["hf"]["prefill_tok_s"]
            same = results["ponder"]["next_token"] == results["hf"]["next_token"]
            print(f"{'':>8} ratio ponder/hf prefill speed {ratio:.2f}, same next token: {same}")
        rows.append(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "dtype": args.dtype, "chunk": args.chunk, "runs": rows}, f, indent=2)
    longest = rows[-1]["ponder"]
    print(
        f"RESULT long_context model={MODEL} tokens={longest['prompt_tokens']} "
        f"prefill_tok_s={longest['prefill_tok_s']} peak_rss_bytes={longest['peak_rss_bytes']} "
        f"kv_bytes={longest['kv_bytes']}"
    )


if __name__ == "__main__":
    main()
