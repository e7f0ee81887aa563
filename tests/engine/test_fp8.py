"""FP8 block quantisation (engine.runtime.fp8) and the loader's FP8 stage: float8 weights come out of the
tensor stream dequantised, their scales consumed, wherever in the checkpoint the scales sit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ponder.engine.config import ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.runtime.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8, scale_shape
from ponder.engine.runtime.loader import iter_checkpoint, load_weights

# -- quantise / dequantise --------------------------------------------------------------------


def test_block_scales_by_hand():
    weight = torch.tensor(
        [
            [1.0, -2.0, 0.0, 0.0, 4.0],
            [0.5, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, -8.0],
        ]
    )
    q, scale = quantize_block_fp8(weight, block_size=2)
    assert q.dtype == FP8_DTYPE and q.shape == (3, 5)
    assert scale.dtype == torch.float32 and scale.shape == (2, 3)
    # amax/448 per 2x2 block (edge blocks are smaller); an all-zero block gets scale 1
    torch.testing.assert_close(scale, torch.tensor([[2 / 448, 1.0, 4 / 448], [1.0, 1.0, 8 / 448]]))
    assert q.float().tolist() == [[224, -448, 0, 0, 448], [112, 0, 0, 0, 0], [0, 0, 0, 0, -448]]
    assert torch.equal(dequantize_block_fp8(q, scale, block_size=2), weight)  # all exactly representable


def test_dequantize_multiplies_each_block_by_its_scale():
    weight = torch.ones(130, 260).to(FP8_DTYPE)  # 2 x 3 blocks of 128, the last ones partial
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = dequantize_block_fp8(weight, scale)
    assert w.shape == (130, 260) and w.dtype == torch.float32
    assert w[0, 0] == 1 and w[127, 127] == 1 and w[0, 128] == 2 and w[127, 255] == 2 and w[0, 256] == 3
    assert w[128, 0] == 4 and w[128, 128] == 5 and w[129, 259] == 6
    assert torch.equal(w.unique(), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert dequantize_block_fp8(weight, scale, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_round_trip_error_is_within_fp8_precision():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=gen) * torch.logspace(-3, 1, 200)  # blocks of very different ranges
    q, scale = quantize_block_fp8(weight)
    assert scale.shape == scale_shape(weight.shape) == (3, 2)
    back = dequantize_block_fp8(q, scale)
    # e4m3: 3 mantissa bits (relative error <= 2^-4); below 2^-6 the subnormal step is 2^-9 (in units of the scale)
    per_element = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - weight).abs() <= weight.abs() / 16 + per_element / 1024).all()
    # each block's largest value maps to +-448, so it survives (up to the fp32 rounding of amax/448*448)
    for r in range(3):
        for c in range(2):
            block = (slice(r * 128, (r + 1) * 128), slice(c * 128, (c + 1) * 128))
            i = weight[block].abs().argmax()
            assert q[block].flatten()[i].float().abs() == 448
            torch.testing.assert_close(back[block].flatten()[i], weight[block].flatten()[i], rtol=1e-6, atol=0)


def test_rectangular_blocks_and_bad_inputs():
    q, scale = quantize_block_fp8(torch.randn(10, 10), block_size=(4, 8))
    assert scale.shape == (3, 2)
    assert dequantize_block_fp8(q, scale, block_size=(4, 8)).shape == (10, 10)
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_block_fp8(q, scale)  # 128x128 blocks need a 1x1 scale
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.randn(4))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_block_fp8(torch.tensor([[1.0, float("inf")]]))


# -- the loader's FP8 stage --------------------------------------------------------------------

CONFIG = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def write_checkpoint(directory: Path, shards: dict[str, dict[str, torch.Tensor]], index: bool = True, **config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**CONFIG, **config}))
    for filename, tensors in shards.items():
        save_file(tensors, directory / filename)
    if index:
        weight_map = {name: filename for filename, tensors in shards.items() for name in tensors}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def stream(directory: Path, **kwargs) -> dict[str, torch.Tensor]:
    config = ModelConfig.from_pretrained(directory)
    return {name: tensor for _, name, tensor in iter_checkpoint(directory, config, **kwargs)}


@pytest.fixture
def fp8_pair():
    gen = torch.Generator().manual_seed(1)
    a, a_scale = quantize_block_fp8(torch.randn(200, 136, generator=gen))
    b, b_scale = quantize_block_fp8(torch.randn(72, 8, generator=gen))
    return a, a_scale, b, b_scale


def test_scales_in_other_shards_before_and_after_their_weights(tmp_path, fp8_pair):
    a, a_scale, b, b_scale = fp8_pair
    norm = torch.randn(8).to(torch.bfloat16)
    path = write_checkpoint(
        tmp_path / "m",
        {
            # a's scale is read before a (first shard); b's scale only after b (last shard)
            "model-00001-of-00002.safetensors": {"a.weight_scale_inv": a_scale, "b.weight": b, "norm.weight": norm},
            "model-00002-of-00002.safetensors": {"a.weight": a, "b.weight_scale_inv": b_scale},
        },
    )
    tensors = stream(path, dtype=torch.bfloat16)
    assert list(tensors) == ["b.weight", "norm.weight", "a.weight"]  # file by file; scales consumed
    assert torch.equal(tensors["a.weight"], dequantize_block_fp8(a, a_scale, dtype=torch.bfloat16))
    assert torch.equal(tensors["b.weight"], dequantize_block_fp8(b, b_scale, dtype=torch.bfloat16))
    assert tensors["a.weight"].dtype == torch.bfloat16 and torch.equal(tensors["norm.weight"], norm)

    raw = stream(path, dequantize_fp8=False)  # the bypass a model running FP8 itself would take
    assert set(raw) == {"a.weight", "a.weight_scale_inv", "b.weight", "b.weight_scale_inv", "norm.weight"}
    assert raw["a.weight"].dtype == FP8_DTYPE and torch.equal(raw["a.weight_scale_inv"], a_scale)


def test_files_without_an_index_and_block_size_from_config(tmp_path):
    q, scale = quantize_block_fp8(torch.randn(20, 12), block_size=(8, 4))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 4]}
    path = write_checkpoint(
        tmp_path / "m",
        {"a.safetensors": {"w.weight_scale_inv": scale}, "b.safetensors": {"w.weight": q}},
        index=False,
        quantization_config=quant,
    )
    assert torch.equal(stream(path)["w.weight"], dequantize_block_fp8(q, scale, block_size=(8, 4)))


def test_fp8_weights_load_into_a_model(tmp_path, fp8_pair):
    a, a_scale, _, _ = fp8_pair

    class Model(nn.Module):
        packed_modules: dict = {}

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(136, 200, bias=False, dtype=torch.bfloat16)

        def checkpoint_skips(self, name: str) -> bool:
            return False

    path = write_checkpoint(tmp_path / "m", {"model.safetensors": {"proj.weight": a, "proj.weight_scale_inv": a_scale}})
    model = Model()
    load_weights(model, iter_checkpoint(path, ModelConfig.from_pretrained(path), dtype=torch.bfloat16), str(path))
    assert torch.equal(model.proj.weight.data, dequantize_block_fp8(a, a_scale, dtype=torch.bfloat16))


def test_float8_weight_without_scale(tmp_path, fp8_pair):
    a, _, _, _ = fp8_pair
    path = write_checkpoint(tmp_path / "m", {"model.safetensors": {"a.weight": a}})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor a\.weight: float8 weight without its scale"):
        stream(path)


def test_scale_without_weight(tmp_path, fp8_pair):
    _, a_scale, b, b_scale = fp8_pair
    shards = {
        "s1.safetensors": {"b.weight": b, "b.weight_scale_inv": b_scale},
        "s2.safetensors": {"a.weight_scale_inv": a_scale},
    }
    path = write_checkpoint(tmp_path / "m", shards)
    with pytest.raises(
        ModelLoadError, match=r"s2\.safetensors: tensor a\.weight_scale_inv: FP8 scale without its weight"
    ):
        stream(path)


def test_scale_of_the_wrong_shape_or_on_a_float_weight(tmp_path, fp8_pair):
    a, a_scale, b, b_scale = fp8_pair
    path = write_checkpoint(tmp_path / "m", {"model.safetensors": {"a.weight": a, "a.weight_scale_inv": b_scale}})
    with pytest.raises(ModelLoadError, match=r"tensor a\.weight: scale shape \(1, 1\) does not fit"):
        stream(path)
    path = write_checkpoint(
        tmp_path / "n", {"model.safetensors": {"a.weight": a.float(), "a.weight_scale_inv": a_scale}}
    )
    with pytest.raises(ModelLoadError, match=r"tensor a\.weight: has a scale .* not float8"):
        stream(path)
