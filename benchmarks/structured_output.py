"""Structured output's cost (issue 25): SmolLM2-135M on the CPU, 64 chat requests held to a JSON
schema against the same 64 unconstrained, same run, same engine settings; tokens per second of
each, their ratio (target >= 0.85), and the time the constraint masks took per step.

Both sides generate exactly `--max-tokens` tokens a request, so their rates compare like for like:
the unconstrained requests ignore EOS, and the schema's `bio` must be longer than that budget
allows (the constrained ones end at `length` too, mid-object, as OpenAI's do). The constrained
side's texts are checked to be prefixes the schema allows (llguidance's own verdict on them).

    python benchmarks/structured_output.py [--requests 64] [--max-tokens 128] [--dtype float32|bfloat16]

prints `RESULT structured_output ...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llguidance  # noqa: E402

from ponder.engine.config import SamplingParams  # noqa: E402
from ponder.engine.constraint import Constraint, llguidance_grammar  # noqa: E402
from ponder.engine.runtime import LLM, constraint_masks  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["science", "art", "sport", "music"]}, "maxItems": 4},
        "bio": {"type": "string", "minLength": 2000},
    },
    "required": ["name", "age", "tags", "bio"],
    "additionalProperties": False,
}
PEOPLE = ["a chemist", "a painter", "a sailor", "a teacher", "a drummer", "a runner", "a farmer", "a poet"]


def conversations(count: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]} number {i} as a JSON object."}]
        for i in range(count)
    ]


def timed_masks() -> list[float]:
    """Each step's mask time (ms), recorded by wrapping the function the runner's mask thread runs."""
    times: list[float] = []
    compute = constraint_masks.bitmask

    def timed(*args):
        started = time.perf_counter()
        try:
            return compute(*args)
        finally:
            times.append((time.perf_counter() - started) * 1000)

    constraint_masks.bitmask = timed
    return times


def run(llm: LLM, chats: list[list[dict]], params: SamplingParams) -> tuple[float, list]:
    started = time.perf_counter()
    outputs = llm.chat(chats, params)
    return time.perf_counter() - started, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    llm = LLM("smollm2-135m", dtype=args.dtype, max_num_seqs=args.requests)
    chats = conversations(args.requests)
    common = {"temperature": 0.7, "seed": 1, "max_tokens": args.max_tokens}
    free = SamplingParams(**common, ignore_eos=True)
    held = SamplingParams(**common, constraint=Constraint("json_schema", json.dumps(SCHEMA)))
    run(llm, chats[:2], free)  # warm: the kernels compiled before the clock starts
    run(llm, chats[:2], held)  # and llguidance's tokenizer built (at the first constrained request)
    masks = timed_masks()
    free_seconds, free_outputs = run(llm, chats, free)
    assert not masks, "an unconstrained batch computed masks"
    held_seconds, held_outputs = run(llm, chats, held)
    free_tokens = sum(len(o.outputs[0].token_ids) for o in free_outputs)
    held_tokens = sum(len(o.outputs[0].token_ids) for o in held_outputs)
    assert all(o.outputs[0].finish_reason == "length" for o in held_outputs)
    grammars = llm.engine.model_runner.constraint_masks.grammars
    assert grammars is not None and held.constraint is not None
    for output in held_outputs:  # every text a prefix the schema allows
        checker = llguidance.LLMatcher(grammars.tokenizer, llguidance_grammar(held.constraint, after_reasoning=False))
        assert checker.consume_tokens(output.outputs[0].token_ids), output.outputs[0].text
    free_rate, held_rate = free_tokens / free_seconds, held_tokens / held_seconds
    print(f"unconstrained: {free_tokens} tokens in {free_seconds:.1f} s = {free_rate:.1f} tok/s")
    print(f"JSON schema:   {held_tokens} tokens in {held_seconds:.1f} s = {held_rate:.1f} tok/s")
    print(f"sample: {held_outputs[0].outputs[0].text[:160]!r}")
    print(
        f"RESULT structured_output model=smollm2-135m dtype={args.dtype} requests={args.requests} "
        f"max_tokens={args.max_tokens} free_tok_s={free_rate:.1f} schema_tok_s={held_rate:.1f} "
        f"ratio={held_rate / free_rate:.2f} mask_steps={len(masks)} mask_p50_ms={statistics.median(masks):.2f} "
        f"mask_p99_ms={sorted(masks)[int(0.99 * (len(masks) - 1))]:.2f}"
    )


if __name__ == "__main__":
    main()
