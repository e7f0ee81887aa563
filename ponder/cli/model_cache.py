"""`ponder models`: the local model cache (pull, make-tiny, list) and `info`, a model's size and
KV-cache memory worked out from its config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ponder.cli.console import cli_errors, console, human_bytes, out
from ponder.engine.errors import PonderEngineError

models_app = typer.Typer(help="The local model cache: pull, make, list, inspect.", no_args_is_help=True)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A model alias, e.g. smollm2-135m")]) -> None:
    """Download a model into the cache (PONDER_MODEL_DIR)."""
    from ponder.engine.model_store import ALIASES, TinyModel, fetch_alias

    with cli_errors():
        if name not in ALIASES:
            raise PonderEngineError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
        if isinstance(ALIASES[name], TinyModel):
            path = fetch_alias(name)
        else:
            path = _pull_with_progress(name)
    out.print(str(path))


def _pull_with_progress(name: str) -> Path:
    from ponder.engine.model_store import fetch_alias

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{name}: downloading", total=None)

        def on_bytes(done: int, total: int) -> None:
            progress.update(task, description=f"{name}: extracting", completed=done, total=total)

        def on_log(message: str) -> None:
            progress.update(task, description=f"{name}: {message}")

        return fetch_alias(name, progress=on_bytes, log=on_log)


@models_app.command("make-tiny")
def models_make_tiny(
    name: Annotated[str, typer.Argument(help="tiny-llama, tiny-qwen2, tiny-r1, tiny-dsv3-*, ...")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory to write (default: the cache)")
    ] = None,
    fp8: Annotated[
        bool, typer.Option("--fp8", help="The FP8 block-quantised variant (tiny-r1 -> tiny-r1-fp8)")
    ] = False,
) -> None:
    """Write a deterministic tiny random checkpoint as a Hugging Face directory."""
    from ponder.engine.model_store import cached_path
    from ponder.engine.tools.tiny import SPECS, make_tiny

    if fp8 and not name.endswith("-fp8"):
        name = f"{name}-fp8"
    with cli_errors():
        if name not in SPECS:
            raise PonderEngineError(f"unknown tiny model {name!r}; known: {', '.join(SPECS)}")
        path = make_tiny(name, output or cached_path(name))
    out.print(str(path))


@models_app.command("list")
def models_list() -> None:
    """Show what is in the model cache."""
    from ponder.engine.model_store import ALIASES, list_cached, model_dir

    cached = list_cached()
    table = Table(title=f"models in {model_dir()}")
    for column in ("name", "format", "size", "path"):
        table.add_column(column)
    for model in cached:
        table.add_row(model.name, model.kind, human_bytes(model.size_bytes), str(model.path))
    out.print(table)
    missing = [alias for alias in ALIASES if alias not in {m.name for m in cached}]
    if missing:
        out.print(f"not cached (pulled on first use): {', '.join(missing)}")


@models_app.command("info")
def models_info(
    model: Annotated[str, typer.Argument(help="An alias, a model directory, a config.json or a GGUF file")],
    dtype: Annotated[str, typer.Option(help="Weight and KV-cache dtype for the byte figures")] = "bfloat16",
    context: Annotated[int, typer.Option(help="Context length for the total KV figure and the jobs that fit")] = 131072,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object")] = False,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel GPUs: per-GPU weight and KV bytes")] = 1,
    ep: Annotated[
        bool, typer.Option("--ep", help="Expert parallel over the --tp GPUs: whole routed experts per GPU")
    ] = False,
    mtp: Annotated[
        bool,
        typer.Option("--mtp", help="Count the MTP layer and its cache (speculative decoding: on by default on CUDA)"),
    ] = False,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Memory per GPU (141GB, 141GiB, 80G, bytes): how many --context jobs fit"),
    ] = None,
    gpu_utilization: Annotated[
        float, typer.Option(help="Fraction of --gpu-memory for weights + KV cache (vLLM's default)")
    ] = 0.9,
) -> None:
    """Architecture, parameters, weight and KV-cache memory, from the config alone (no weights are read).

    With --tp N (and --ep): weight bytes and KV bytes per token per GPU as the engine shards the
    model over N GPUs (column/row-parallel linears, vocab-parallel embedding and head, heads split,
    KV heads replicated when fewer than N, the MLA latent cache replicated on every GPU, routed
    experts split along their width, or whole experts E/N per GPU with --ep; norms, router, MLA
    down-projections replicated). An FP8 checkpoint counts as kept in FP8 with its block scales.
    With --mtp: plus the MTP layer the engine loads to draft tokens, and its latent cache.
    With --gpu-memory: free bytes per GPU after the weights, and how many jobs of --context tokens
    fit in the KV budget, gpu_memory x gpu_utilization - weights (activations not counted)."""
    from ponder.engine.config import ModelConfig
    from ponder.engine.model_store import resolve_model
    from ponder.engine.tools.model_size import DTYPE_BYTES, mha_kv_cache_bytes_per_token, model_size
    from ponder.engine.tools.parallel_size import memory_plan, parallel_size, parse_memory_size

    with cli_errors():
        if dtype not in DTYPE_BYTES:
            raise PonderEngineError(f"dtype must be one of {', '.join(DTYPE_BYTES)}")
        if context < 1:
            raise PonderEngineError("context must be >= 1")
        memory = parse_memory_size(gpu_memory) if gpu_memory is not None else None
        path = resolve_model(model, fetch=False)
        config = ModelConfig.from_pretrained(path)
        try:
            size = model_size(config, DTYPE_BYTES[dtype])
            per_token = config.kv_cache_bytes_per_token(DTYPE_BYTES[dtype])
            mha_per_token = mha_kv_cache_bytes_per_token(config, DTYPE_BYTES[dtype])
            parallel = parallel_size(config, tp, ep, DTYPE_BYTES[dtype], mtp=mtp and config.num_mtp_layers > 0)
            plan = memory_plan(parallel, memory, gpu_utilization, context) if memory is not None else None
        except PonderEngineError as e:
            raise PonderEngineError(f"{path}: {e}") from None
        except (KeyError, TypeError) as e:
            raise PonderEngineError(f"{path}: missing or invalid field {e}") from None
    info = _model_info(config, size, dtype, per_token, mha_per_token, context) | _parallel_info(parallel, plan)
    show_parallel = tp > 1 or ep or mtp or plan is not None
    if as_json:
        import json

        out.print(json.dumps(info, indent=2), highlight=False, soft_wrap=True)
        return
    for key, value in _info_rows(info) + (_parallel_rows(info) if show_parallel else []):
        out.print(f"{key:<28} {value}", highlight=False, soft_wrap=True)


def _parallel_info(parallel, plan) -> dict:
    info = {
        "tensor_parallel": parallel.tp,
        "expert_parallel": parallel.ep,
        "mtp_layer": parallel.mtp,
        "routed_experts_per_gpu": parallel.routed_experts_per_gpu,
        "weight_bytes_per_gpu": parallel.loaded_weight_bytes_per_gpu,  # what each GPU holds (fp8 ckpt: fp8)
        "weights_per_gpu_fp8": parallel.weight_bytes_fp8_per_gpu is not None,
        "replicated_weight_bytes_per_gpu": (
            parallel.replicated_bytes_fp8_per_gpu
            if parallel.weight_bytes_fp8_per_gpu is not None
            else parallel.replicated_bytes_per_gpu
        ),
        "dtype_weight_bytes_per_gpu": parallel.weight_bytes_per_gpu,
        "kv_cache_bytes_per_token_per_gpu": parallel.kv_cache_bytes_per_token_per_gpu,
    }
    if plan is not None:
        info |= {
            "gpu_memory_bytes": plan.gpu_memory_bytes,
            "gpu_utilization": plan.gpu_utilization,
            "free_bytes_per_gpu": plan.free_bytes_per_gpu,
            "kv_budget_bytes_per_gpu": plan.kv_budget_bytes_per_gpu,
            "kv_cache_bytes_per_job_per_gpu": plan.kv_cache_bytes_per_job_per_gpu,
            "jobs": plan.jobs,
        }
    return info


def _parallel_rows(info: dict) -> list[tuple[str, str]]:
    tp, dtype, context = info["tensor_parallel"], info["dtype"], info["context_tokens"]
    how = f"tensor parallel over {tp} GPU{'s' if tp > 1 else ''}"
    if info["expert_parallel"]:
        how += f", expert parallel: {info['routed_experts_per_gpu']} routed experts per GPU"
    elif "routed_experts" in info:
        how += ", routed experts split along their width"
    if info["mtp_layer"]:
        how += ", with the MTP layer (speculative decoding)"
    weights, replicated = info["weight_bytes_per_gpu"], info["replicated_weight_bytes_per_gpu"]
    kind = "fp8 ckpt" if info["weights_per_gpu_fp8"] else dtype
    rows = [
        ("parallel", how),
        (f"weight bytes/GPU ({kind})", f"{weights:,} ({human_bytes(weights)}), {replicated:,} of it on every GPU"),
    ]
    kv = info["kv_cache_bytes_per_token_per_gpu"]
    note = "MLA latent, whole on every GPU" if info["attention"] == "mla" else "KV heads split, >= 1 per GPU"
    rows.append((f"KV/token per GPU ({dtype})", f"{kv:,} ({note})"))
    if "jobs" in info:
        memory, util = info["gpu_memory_bytes"], info["gpu_utilization"]
        budget, per_job = info["kv_budget_bytes_per_gpu"], info["kv_cache_bytes_per_job_per_gpu"]
        rows += [
            ("GPU memory", f"{memory:,} ({human_bytes(memory)}), {util:g} of it for weights + KV"),
            (
                "free per GPU after weights",
                f"{info['free_bytes_per_gpu']:,} ({human_bytes(info['free_bytes_per_gpu'])})",
            ),
            ("KV budget per GPU", f"{budget:,} ({human_bytes(budget)}) = {util:g} x memory - weights"),
            ("KV per job per GPU", f"{per_job:,} ({human_bytes(per_job)}) for {context:,} tokens"),
            (f"{context:,}-token jobs", f"{info['jobs']} (KV budget // KV per job; activations not counted)"),
        ]
    return rows


def _model_info(config, size, dtype: str, per_token: int, mha_per_token: int, context: int) -> dict:
    from ponder.engine.tools.checkpoint_tensors import is_moe_layer

    x = config.extra
    info = {
        "model_type": config.model_type,
        "attention": config.attention_kind,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "parameters": size.parameters,
        "mtp_parameters": size.mtp_parameters,
        "total_parameters": size.total_parameters,
        "activated_parameters": size.activated_parameters,
        "dtype": dtype,
        "weight_bytes": size.weight_bytes,
        "mtp_weight_bytes": size.mtp_weight_bytes,
        "fp8_weight_bytes": size.weight_bytes_fp8,
        "fp8_mtp_weight_bytes": size.mtp_weight_bytes_fp8,
        "kv_cache_bytes_per_token": per_token,
        "context_tokens": context,
        "kv_cache_bytes": per_token * context,
        "max_position_embeddings": config.max_position_embeddings,
    }
    if config.model_type == "deepseek_v3":
        info |= {
            "dense_layers": sum(1 for i in range(config.num_hidden_layers) if not is_moe_layer(config, i)),
            "mtp_layers": int(x.get("num_nextn_predict_layers") or 0),
            "routed_experts": int(x["n_routed_experts"]),
            "experts_per_token": int(x["num_experts_per_tok"]),
            "shared_experts": int(x.get("n_shared_experts") or 0),
        }
    if config.attention_kind == "mla":
        info |= {"mha_kv_cache_bytes_per_token": mha_per_token, "mha_kv_cache_bytes": mha_per_token * context}
    return info


def _info_rows(info: dict) -> list[tuple[str, str]]:
    dtype, context = info["dtype"], info["context_tokens"]
    layers = f"{info['layers']}"
    if "routed_experts" in info:
        moe = info["layers"] - info["dense_layers"]
        layers += f" ({info['dense_layers']} dense, {moe} MoE)"
        if info["mtp_layers"]:
            layers += f" + {info['mtp_layers']} MTP"
    rows = [
        ("model_type", info["model_type"]),
        ("attention", info["attention"]),
        ("layers", layers),
        ("hidden size", f"{info['hidden_size']:,}"),
        ("heads / kv heads", f"{info['num_attention_heads']} / {info['num_key_value_heads']}"),
    ]
    if "routed_experts" in info:
        experts = f"{info['routed_experts']} routed ({info['experts_per_token']} per token)"
        rows.append(("experts", f"{experts} + {info['shared_experts']} shared"))
    rows.append(("parameters", _count(info["parameters"]) + (", main model" if info["mtp_parameters"] else "")))
    if info["mtp_parameters"]:
        rows.append(("parameters (MTP)", _count(info["mtp_parameters"])))
        rows.append(("parameters (total)", _count(info["total_parameters"])))
    if info["activated_parameters"] != info["parameters"]:
        rows.append(("activated per token", _count(info["activated_parameters"])))
    rows.append((f"weight bytes ({dtype})", _weights(info["weight_bytes"], info["mtp_weight_bytes"])))
    if info["fp8_weight_bytes"] is not None:
        rows.append(("weight bytes (fp8 ckpt)", _weights(info["fp8_weight_bytes"], info["fp8_mtp_weight_bytes"])))
    per_token, total = info["kv_cache_bytes_per_token"], info["kv_cache_bytes"]
    rows.append((f"KV bytes/token ({dtype})", f"{per_token:,}"))
    rows.append((f"KV bytes for {context:,} tokens", f"{total:,} ({human_bytes(total)})"))
    if "mha_kv_cache_bytes_per_token" in info:
        mha_per_token, mha_total = info["mha_kv_cache_bytes_per_token"], info["mha_kv_cache_bytes"]
        rows.append(
            (
                "KV if MHA (no MLA)",
                f"{mha_per_token:,} bytes/token, {mha_total:,} ({human_bytes(mha_total)}) "
                f"for {context:,} tokens: {mha_per_token / per_token:.1f}x",
            )
        )
    rows.append(("max context", f"{info['max_position_embeddings']:,}"))
    return rows


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.1f}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.1f}M)"


def _weights(main: int, mtp: int) -> str:
    text = f"{main:,} ({human_bytes(main)})"
    return text + (f"; {main + mtp:,} ({human_bytes(main + mtp)}) with MTP" if mtp else "")
