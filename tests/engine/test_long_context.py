"""Long context on tiny-r1 (YaRN rope, MLA latent cache): a 16,384-token prompt goes through
chunked prefill and its next greedy token equals transformers' on the same weights."""

from __future__ import annotations

import torch

from ponder.engine import SamplingParams

PROMPT_TOKENS = 16_384


def test_16k_prompt_next_token_matches_transformers(make_llm, hf_model):
    prompt = torch.randint(100, 128_000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(16)).tolist()
    engine = make_llm("tiny-r1", max_num_batched_tokens=2048).engine
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    steps, finished = 0, []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
        steps += 1
    assert steps == PROMPT_TOKENS // 2048  # eight prefill chunks, the last one samples
    (out,) = finished
    assert out.usage.prompt_tokens == PROMPT_TOKENS
    assert out.token_ids == [hf_next_token(hf_model("tiny-r1"), prompt)]


@torch.inference_mode()
def hf_next_token(model, prompt: list[int], chunk: int = 2048) -> int:
    """transformers' own incremental path (its KV cache, fed chunk by chunk): one 16K forward pass
    would materialise 16K x 16K attention scores per head, 11 GB here."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    for start in range(0, len(prompt), chunk):
        logits = model(ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())
