"""Plot docs/engine_throughput_*.json (written by engine_throughput.py --json) into one PNG.

    python benchmarks/plot_engine_throughput.py docs/engine_throughput_bf16.json docs/engine_throughput_fp32.json \\
        -o docs/engine_throughput.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("-o", "--output", default="docs/engine_throughput.png")
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in args.results]

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    width = 0.38
    positions = range(len(runs))
    ponder = [r["ponder_tok_s"] for r in runs]
    hf = [r["hf_tok_s"] for r in runs]
    ax.bar([p - width / 2 for p in positions], ponder, width, label="Ponder (continuous batching, 64 at once)")
    ax.bar([p + width / 2 for p in positions], hf, width, label="transformers generate() (static batches of 8)")
    for p, run in zip(positions, runs, strict=True):
        ax.annotate(f"{run['ratio']:.2f}x", (p, max(run["ponder_tok_s"], run["hf_tok_s"])), ha="center", va="bottom")
    ax.set_xticks(list(positions), [f"{r['dtype']}" for r in runs])
    ax.set_ylabel("output tokens / s")
    first = runs[0]
    ax.set_title(
        f"{first['model']} on {first['threads']} CPU threads: {first['requests']} requests, "
        f"{first['output_tokens'] // first['requests']} tokens each",
        fontsize=9,
    )
    ax.set_ylim(0, max(ponder + hf) * 1.45)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
