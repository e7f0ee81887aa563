"""Configuration: the model's shape (from config.json or GGUF metadata), the engine's sizes, and
per-request sampling. Plain validated dataclasses; no torch, so the API process can use them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponder.engine.constraint import Constraint
from ponder.engine.errors import ConfigError, ModelLoadError

# model_type -> attention kind; the KV cache layout follows the kind (docs/architecture.md#kv-cache-layouts).
ATTENTION_KINDS = {"llama": "mha", "qwen2": "mha", "deepseek_v3": "mla"}
SUPPORTED_MODEL_TYPES = tuple(ATTENTION_KINDS)
# SamplingParams.n at most: samples of one request (each a sequence holding a seat in the batch).
MAX_SAMPLES = 64
# SamplingParams.logprobs / prompt_logprobs at most: the alternatives reported per token (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
# OpenAI's bounds on the sampler's parameters: the engine's checks and the API's schemas share them.
PENALTY_BOUND = 2  # frequency_penalty and presence_penalty in [-2, 2]
LOGIT_BIAS_BOUND = 100  # each logit_bias in [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300


@dataclass
class ModelConfig:
    """The architecture, normalised across HF config.json and GGUF metadata."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Everything else config.json says, for architecture-specific fields (MLA ranks, MoE sizes).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_kind(self) -> str:
        return ATTENTION_KINDS[self.model_type]

    @property
    def num_mtp_layers(self) -> int:
        """DeepSeek-V3's multi-token-prediction layers after the decoder layers (R1: 1)."""
        return int(self.extra.get("num_nextn_predict_layers") or 0) if self.model_type == "deepseek_v3" else 0

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token takes across all layers (MLA caches only the latent + rope key)."""
        if self.attention_kind == "mla":
            per_layer = self.extra["kv_lora_rank"] + self.extra["qk_rope_head_dim"]
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return self.num_hidden_layers * per_layer * dtype_bytes

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a checkpoint directory's config.json, or a GGUF file's metadata."""
        path = Path(path)
        if path.suffix == ".gguf":
            from ponder.engine.gguf_file import read_gguf_config

            return cls.from_dict(read_gguf_config(path), source=str(path))
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ModelLoadError(f"{config_file}: config.json not found (is {path} a model directory?)")
        try:
            data = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{config_file}: not valid JSON: {e}") from e
        return cls.from_dict(data, source=str(config_file))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        model_type = data.get("model_type")
        if model_type not in ATTENTION_KINDS:
            raise ModelLoadError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if data.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: sliding-window attention (use_sliding_window) is not supported")
        try:
            return cls._parse(data, model_type)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: missing or invalid field {e}") from e

    @classmethod
    def _parse(cls, data: dict[str, Any], model_type: str) -> ModelConfig:
        heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        rope = _rope_parameters(data)
        eos = data.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.pop("rope_theta", data.get("rope_theta", 10000.0))),
            rope_scaling=rope or None,
            max_position_embeddings=int(data.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them only when the config says so.
            attention_bias=model_type == "qwen2" or bool(data.get("attention_bias", False)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            extra=dict(data),
        )


def _rope_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
    Returns the scaling dict with `rope_theta` folded in; a plain rope has only the theta."""
    params = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if params.get("rope_type") in (None, "default"):
        params.pop("rope_type", None)
        theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
        return {"rope_theta": theta}
    params.setdefault("rope_theta", data.get("rope_theta", 10000.0))
    return params


@dataclass
class EngineConfig:
    """Sizes and switches of one engine instance."""

    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    # Bytes for the KV cache; None = a fraction of free memory (runtime/kv_cache.py).
    kv_cache_memory: int | None = None
    # A fixed number of KV blocks overrides the memory budget (tests use it to force preemption).
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    # FP8 checkpoints (docs/architecture.md#fp8-weights): "keep" runs the linears on their FP8 weights
    # and block scales, "dequantize" dequantises them to `dtype` while loading, "auto" keeps them on CUDA only.
    fp8_weights: str = "auto"
    # Ranks the model is split over (docs/architecture.md#tensor-parallelism); 1 = no process group.
    tensor_parallel_size: int = 1
    # Routed experts whole over the same ranks (EP size = TP size, as vLLM): X / N experts per rank
    # instead of 1/N of every expert (docs/architecture.md#tensor-parallelism). A no-op on one rank.
    enable_expert_parallel: bool = False
    # Speculative decoding with the model's MTP layer (docs/architecture.md#speculative-decoding):
    # tokens drafted per step; 0 = off; None = 1 for a model with an MTP layer on CUDA, else off.
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16")
        _require(
            self.fp8_weights in ("auto", "keep", "dequantize"),
            f"fp8_weights must be 'auto', 'keep' or 'dequantize', got {self.fp8_weights!r}",
        )
        _require(self.block_size > 0, "block_size must be positive")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory must be > 0")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1")
        _require(
            self.num_speculative_tokens is None or self.num_speculative_tokens >= 0,
            "num_speculative_tokens must be >= 0",
        )

    def speculative_tokens(self, model: ModelConfig) -> int:
        """num_speculative_tokens resolved for this model and device (a ConfigError when it asks for
        drafts from a model without an MTP layer)."""
        if self.num_speculative_tokens is None:
            return 1 if model.num_mtp_layers and self.device.startswith("cuda") else 0
        if self.num_speculative_tokens and not model.num_mtp_layers:
            raise ConfigError(
                f"num_speculative_tokens={self.num_speculative_tokens} needs a model with an MTP layer "
                f"(DeepSeek-V3/R1 with num_nextn_predict_layers >= 1); this {model.model_type} model has none"
            )
        return self.num_speculative_tokens


@dataclass
class SamplingParams:
    """How to sample one request; the defaults follow vLLM's."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Thinking budget: after this many reasoning tokens the end-of-thinking tokens are forced.
    max_reasoning_tokens: int | None = None
    skip_special_tokens: bool = True
    # False: the output is one text, `content`, the think tags as the model wrote them (no reasoning
    # split, no thinking budget: the legacy completions route's raw text).
    split_reasoning: bool = True
    # Parallel sampling: n samples of the prompt, which is prefilled once and then forked
    # (docs/architecture.md#parallel-sampling); each sample has its own stop, budget and finish.
    n: int = 1
    # The random stream of a seeded request's first sample (sample i draws stream sample_index + i):
    # an n=1 request with sample_index=i draws exactly what sample i of an n-request with the same
    # seed draws (a job resumes one sample this way). Stream 0 is a plain request's.
    sample_index: int = 0
    # Log probabilities (ponder/engine/runtime/logprobs.py), of the model's distribution before any
    # sampling modification: per output token its own and the `logprobs` best alternatives; per
    # prompt token (the first has none) the same with `prompt_logprobs` alternatives. None: not computed.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Constrained decoding: what the answer (after the reasoning, if any) must be (ponder/engine/grammar.py).
    constraint: Constraint | None = None
    # Logits processors (ponder/engine/runtime/layers/logits_processors.py); the defaults are off.
    # OpenAI's penalties over the sample's output tokens: logit -= frequency * count + presence * (count > 0).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # transformers' over prompt and output: a seen token's logit is divided by it (multiplied if negative).
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # Tokens below min_p times the top token's probability are dropped (after temperature; sampled rows only).
    min_p: float = 0.0
    # EOS and stop_token_ids are masked, and stop strings do not stop, before this many output tokens.
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(self.temperature >= 0, "temperature must be >= 0")
        _require(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1")
        _require(self.max_tokens >= 1, "max_tokens must be >= 1")
        _require(self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _require(
            self.max_reasoning_tokens is None or self.max_reasoning_tokens >= 0,
            "max_reasoning_tokens must be >= 0",
        )
        _require(
            self.split_reasoning or self.max_reasoning_tokens is None,
            "max_reasoning_tokens needs split_reasoning: a budget ends the thinking it tells apart",
        )
        _require(isinstance(self.n, int) and 1 <= self.n <= MAX_SAMPLES, f"n must be an integer in [1, {MAX_SAMPLES}]")
        _require(
            isinstance(self.sample_index, int) and 0 <= self.sample_index < 2**32,
            "sample_index must be an integer in [0, 2**32)",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                f"{name} must be None or an integer in [0, {MAX_LOGPROBS}]",
            )
        self._check_logits_processors()

    def _check_logits_processors(self) -> None:
        """The ranges OpenAI and vLLM accept (a NaN fails every comparison, so it is refused too)."""
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(-PENALTY_BOUND <= value <= PENALTY_BOUND, f"{name} must be in [-{PENALTY_BOUND}, {PENALTY_BOUND}]")
        _require(0 < self.repetition_penalty < math.inf, "repetition_penalty must be > 0 (1 = off)")
        _require(0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        _require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens must be an integer in [0, max_tokens]",
        )
        self.logit_bias = self.logit_bias or {}
        _require(isinstance(self.logit_bias, dict), "logit_bias must be a dict of token id -> bias")
        for token, bias in self.logit_bias.items():
            _require(
                isinstance(token, int) and not isinstance(token, bool) and token >= 0,
                f"logit_bias keys must be token ids (integers >= 0), got {token!r}",
            )
            _require(
                isinstance(bias, int | float) and -LOGIT_BIAS_BOUND <= bias <= LOGIT_BIAS_BOUND,
                f"logit_bias of token {token} must be in [-{LOGIT_BIAS_BOUND}, {LOGIT_BIAS_BOUND}], got {bias!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
