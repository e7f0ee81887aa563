"""The R1 text path end to end on tiny-r1 (random DeepSeek-V3 weights, the real R1 tokenizer): the
chat template's prompt, then the reasoning split, thinking budget and `\\boxed{}` answer on outputs
the real engine produces while its sampler is scripted (the forward passes run; only the token
chosen from the logits is replaced, since random weights write nothing meaningful)."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.chat import MATH_DIRECTIVE
from ponder.engine.reasoning import THINK_END_FORCED
from ponder.engine.runtime import LLM

BOS, EOS, USER, ASSISTANT, THINK, END_THINK, NEWLINE = 0, 1, 128803, 128804, 128798, 128799, 201
QUESTION = [{"role": "user", "content": "What is 6*7?"}]
REASONING = "Let me compute 6*7. Six sevens: 7+7+7+7+7+7 = 42. So it is 42."
ANSWER = "The answer is \\boxed{42}."


class ScriptedSampler:
    """Stands in for `ModelRunner.sample`: each sequence gets the next id of its script. Scripts go
    to requests in the order the requests first sample (the order they were added)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pending: deque[list[int]] = deque()
        self.active: dict[str, deque[int]] = {}
        self.calls = 0

    def add(self, *scripts: list[int]) -> None:
        self.pending.extend(scripts)

    def __call__(
        self, logits: torch.Tensor, seqs: list, row_drafts=None, row_positions=None, row_streams=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert logits.shape == (len(seqs), self.vocab_size)  # the real forward pass ran for each
        self.calls += 1
        ids = []
        for seq in seqs:
            if seq.request_id not in self.active:
                self.active[seq.request_id] = deque(self.pending.popleft())
            script = self.active[seq.request_id]
            assert script, f"{seq.request_id}: the script ran out"
            ids.append(script.popleft())
        tokens = torch.tensor(ids, dtype=torch.int64, device=logits.device)
        return tokens, torch.zeros_like(tokens, dtype=torch.bool)  # no drafts: speculation is off here


@pytest.fixture(scope="module")
def llm():
    # Our own engine (not make_llm's shared one): its sampler gets patched.
    return LLM("tiny-r1", max_model_len=1024, max_num_seqs=4)


@pytest.fixture
def scripted(llm, monkeypatch):
    sampler = ScriptedSampler(llm.engine.model_config.vocab_size)
    monkeypatch.setattr(llm.engine.model_runner, "sample", sampler)
    yield sampler
    engine = llm.engine  # a failed test may leave requests behind: the next test starts clean
    for request_id in list(engine.output_processor.states):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


def encode(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(text, add_special_tokens=False)


def stream(llm, messages, params: SamplingParams, request_id: str = "r1"):
    """Run one chat request step by step; check that the deltas add up to the final fields."""
    engine = llm.engine
    engine.add_request(request_id, llm.tokenizer.encode_chat(messages), params)
    text = reasoning = content = ""
    ids: list[int] = []
    reasoning_steps = content_steps = 0
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert not (content and out.delta_reasoning), "reasoning streamed after content had started"
            text, reasoning, content = (
                text + out.delta_text,
                reasoning + out.delta_reasoning,
                content + out.delta_content,
            )
            ids += out.new_token_ids
            reasoning_steps += bool(out.delta_reasoning)
            content_steps += bool(out.delta_content)
            if out.finished:
                final = out
    assert final is not None
    assert (text, reasoning, content, ids) == (final.text, final.reasoning_content, final.content, final.token_ids)
    return final, reasoning_steps, content_steps


# -- the prompt -----------------------------------------------------------------------------------
def test_chat_renders_the_r1_template(llm):
    params = SamplingParams(temperature=0, max_tokens=1)
    (out,) = llm.chat(QUESTION, params)
    prompt = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 6*7?<｜Assistant｜><think>\n"
    assert out.prompt_token_ids[:2] == [BOS, USER] and out.prompt_token_ids.count(BOS) == 1
    assert out.prompt_token_ids[-3:] == [ASSISTANT, THINK, NEWLINE]
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)

    # The model card's rules: no system prompt (folded into the first user turn), the maths directive.
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION]
    (out,) = llm.chat(conversation, params, fold_system=True, math=True)
    prompt = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt == (
        f"<｜begin▁of▁sentence｜><｜User｜>Be brief.\n\nWhat is 6*7?\n{MATH_DIRECTIVE}<｜Assistant｜><think>\n"
    )
    assert out.prompt_token_ids.count(BOS) == 1 and out.prompt_token_ids.count(USER) == 1


# -- forced outputs -------------------------------------------------------------------------------
def test_reasoning_then_answer(llm, scripted):
    script = [*encode(llm, f"{REASONING}\n</think>\n\n{ANSWER}"), EOS]
    assert script.count(END_THINK) == 1
    scripted.add(script)
    (out,) = llm.chat(QUESTION, SamplingParams(max_tokens=200))
    assert out.token_ids == script
    assert out.text == f"{REASONING}\n</think>\n\n{ANSWER}"  # EOS is special: not in the text
    assert out.reasoning_content == REASONING
    assert out.content == ANSWER
    assert out.answer == "42"
    assert out.finish_reason == "stop"
    assert out.usage.completion_tokens == len(script)
    assert out.usage.reasoning_tokens == script.index(END_THINK) + 1
    assert scripted.calls == len(script)  # one forward pass per sampled token

    scripted.add(script)
    streamed, reasoning_steps, content_steps = stream(llm, QUESTION, SamplingParams(max_tokens=200))
    assert (streamed.reasoning_content, streamed.content, streamed.answer) == (REASONING, ANSWER, "42")
    assert reasoning_steps > 1 and content_steps > 1  # both channels really stream, token by token


def test_model_writes_its_own_think_tag(llm, scripted):
    # R1 sometimes opens <think> again although the template already did.
    script = [*encode(llm, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"), EOS]
    assert script[0] == THINK
    scripted.add(script)
    out, _, _ = stream(llm, QUESTION, SamplingParams(max_tokens=200))
    assert (out.reasoning_content, out.content, out.answer, out.finish_reason) == (REASONING, ANSWER, "42", "stop")
    assert out.usage.reasoning_tokens == script.index(END_THINK) + 1
    assert out.usage.completion_tokens == len(script)


def test_cut_off_while_thinking_is_all_reasoning(llm, scripted):
    reasoning = f"{REASONING} Maybe \\boxed{{42}}? Let me double-check that once more"
    ids = encode(llm, reasoning)
    max_tokens = len(ids) - 3
    scripted.add(ids)
    out, _, content_steps = stream(llm, QUESTION, SamplingParams(max_tokens=max_tokens))
    assert out.finish_reason == "length"
    assert out.token_ids == ids[:max_tokens]
    assert out.reasoning_content == llm.tokenizer.decode(ids[:max_tokens]).strip()
    assert out.content == "" and content_steps == 0
    assert out.answer is None  # a box inside the reasoning is not the answer
    assert out.usage.reasoning_tokens == out.usage.completion_tokens == max_tokens


def test_answer_comes_from_the_content(llm, scripted):
    reasoning = "Is it \\boxed{41}? No: 6*7 = 42."
    script = [*encode(llm, f"{reasoning}\n</think>\n\nSo \\boxed{{42}}."), EOS]
    no_box = [*encode(llm, f"{reasoning}\n</think>\n\nForty-two."), EOS]
    scripted.add(script, no_box)
    boxed, plain = llm.chat([QUESTION, QUESTION], SamplingParams(max_tokens=100))
    assert (boxed.reasoning_content, boxed.content, boxed.answer) == (reasoning, "So \\boxed{42}.", "42")
    assert (plain.reasoning_content, plain.content, plain.answer) == (reasoning, "Forty-two.", None)


# -- the thinking budget --------------------------------------------------------------------------
def test_thinking_budget_forces_r1s_end_tag(llm, scripted):
    forced = llm.engine.output_processor.think_end_forced_ids
    assert forced == encode(llm, THINK_END_FORCED) == [NEWLINE, END_THINK, 271]  # "\n", "</think>", "\n\n"
    budget = 6
    thinking = encode(llm, REASONING)  # never closes thinking on its own
    answer = encode(llm, ANSWER)
    assert len(thinking) > budget
    scripted.add([*thinking[:budget], *answer, EOS])
    out, _, _ = stream(llm, QUESTION, SamplingParams(max_tokens=100, max_reasoning_tokens=budget))
    assert out.token_ids == [*thinking[:budget], *forced, *answer, EOS]
    assert out.token_ids.count(END_THINK) == 1 and out.text.count("</think>") == 1
    assert out.reasoning_content == llm.tokenizer.decode(thinking[:budget]).strip()
    assert (out.content, out.answer, out.finish_reason) == (ANSWER, "42", "stop")
    assert out.usage.reasoning_tokens == budget + 2  # up to and including the forced "</think>"
    assert out.usage.completion_tokens == budget + len(forced) + len(answer) + 1


def test_thinking_budget_in_a_batch(llm, scripted):
    # The forced tokens run as a chunk next to another request's decodes; the budget is per request.
    budget = 4
    thinking, answer = encode(llm, REASONING), encode(llm, ANSWER)
    free = [*encode(llm, f"{REASONING}\n</think>\n\n{ANSWER}"), EOS]
    scripted.add([*thinking[:budget], *answer, EOS], free)
    params = [SamplingParams(max_tokens=100, max_reasoning_tokens=budget), SamplingParams(max_tokens=100)]
    capped, unbounded = llm.chat([QUESTION, QUESTION], params)
    assert capped.reasoning_content == llm.tokenizer.decode(thinking[:budget]).strip()
    assert capped.content == ANSWER and capped.usage.reasoning_tokens == budget + 2
    assert unbounded.token_ids == free and unbounded.reasoning_content == REASONING
    assert unbounded.content == ANSWER and unbounded.usage.reasoning_tokens == free.index(END_THINK) + 1


def test_thinking_budget_cut_by_max_tokens(llm, scripted):
    # Room for only part of the forced tag: the request ends (length) still inside the reasoning.
    budget = 5
    thinking = encode(llm, REASONING)
    scripted.add(thinking[:budget])
    out, _, _ = stream(llm, QUESTION, SamplingParams(max_tokens=budget + 1, max_reasoning_tokens=budget))
    assert out.token_ids == [*thinking[:budget], NEWLINE]
    assert out.finish_reason == "length"
    assert out.content == "" and out.usage.reasoning_tokens == budget + 1


def test_zero_thinking_budget_closes_thinking_before_the_first_token(llm, scripted):
    answer = encode(llm, ANSWER)
    scripted.add([*answer, EOS])
    out, reasoning_steps, _ = stream(llm, QUESTION, SamplingParams(max_tokens=50, max_reasoning_tokens=0))
    assert out.token_ids == [NEWLINE, END_THINK, 271, *answer, EOS]
    assert (out.reasoning_content, out.content, out.answer) == ("", ANSWER, "42") and reasoning_steps == 0
    assert out.usage.reasoning_tokens == 2
    assert out.metrics.arrival_time <= out.metrics.first_scheduled_time <= out.metrics.first_token_time

    # No room for the whole tag: the request ends when it is added, and is still reported.
    (out,) = llm.chat(QUESTION, SamplingParams(max_tokens=2, max_reasoning_tokens=0))
    assert out.token_ids == [NEWLINE, END_THINK] and out.finish_reason == "length"
    assert (out.reasoning_content, out.content, out.usage.reasoning_tokens) == ("", "", 2)
    assert scripted.calls == len(answer) + 1  # the model never ran for the second request
