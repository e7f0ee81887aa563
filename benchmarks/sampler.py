"""The sampler's cost per step on R1's vocabulary (129,280 tokens), one core: a batch of sampled rows
drawn by the whole-vocabulary race (the reference: Exp(1) noise for every token, a sort of the
vocabulary for a nucleus) and by the sampler as it runs (the race among a row's top-k, or among
the 1,024 best tokens where the nucleus lies), side by side on the same logits, with the ratio.
`narrow`: the rows the sampler drew among candidates (all, when every nucleus fits).

The logits are random with a scale that makes distributions about as peaked as a language model's
(SmolLM2's nuclei at temperature 0.6 / top_p 0.95: median 3 tokens, largest 295).

    python benchmarks/sampler.py [--rows 256] [--vocab 129280]
"""

from __future__ import annotations

import argparse
import time

import torch

from ponder.engine.runtime.layers.sampler import Sampler, apply_top_k_top_p, draw_from_vocabulary, with_nucleus_bound

SETTINGS = {  # name: (temperature, top_p, top_k or None)
    "top-k 4": (1.0, 1.0, 4),
    "top-k 20, top-p 0.95": (0.6, 0.95, 20),
    "top-p 0.95 (R1's)": (0.6, 0.95, None),
}


def seconds(run, repeats: int = 3) -> float:
    """CPU seconds of one call, the best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def compare(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> tuple[float, float, int]:
    """(reference seconds, sampler seconds, rows drawn among candidates) for one setting."""
    count, vocab = logits.shape
    temperatures, top_ps = torch.full((count,), temperature), torch.full((count,), top_p)
    top_ks = torch.full((count,), top_k or vocab)
    rows: list[torch.Generator | None] = [None] * count  # every row on the shared stream
    drafts, generator = torch.full((count,), -1), torch.Generator().manual_seed(0)
    scaled = logits / temperatures[:, None]
    whole = (torch.ones(count), torch.full((count,), vocab))  # the masks are applied: off in the draw

    def race_over_vocabulary() -> None:
        masked = apply_top_k_top_p(scaled, top_ks, top_ps)  # a sort of the vocabulary without a top-k
        draw_from_vocabulary(masked, *whole, rows, generator, drafts, None)

    reference = seconds(race_over_vocabulary)
    ours = seconds(lambda: Sampler()(logits, temperatures, top_ps, top_ks, rows, generator))
    narrow = int((with_nucleus_bound(logits, temperatures, top_ps, top_ks) < vocab).sum())
    return reference, ours, narrow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=129_280)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 4  # [B, V]
    print(f"{args.rows} rows x {args.vocab} tokens, one core: CPU seconds per step")
    print(f"{'setting':24} {'vocabulary race':>16} {'sampler':>9} {'ratio':>7} {'narrow':>7}")
    for name, setting in SETTINGS.items():
        reference, ours, narrow = compare(logits, *setting)
        print(f"{name:24} {reference:16.3f} {ours:9.3f} {reference / ours:6.1f}x {narrow:7}")


if __name__ == "__main__":
    main()
