"""`quantize` output: the streamed safetensors writer produces exactly what the in-memory
conversion does, in a file safetensors itself reads."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan.checkpoint.io import read_tensor_specs
from turbowan.quant.quantize import quantize_file, quantize_state_dict, quantized_plan
from turbowan.quant.safetensors_stream import write_safetensors_streaming

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"


@pytest.fixture(scope="module")
def bf16_state():
    g = load_file(str(GOLDEN))
    return {k[8:]: v.to(torch.bfloat16) for k, v in g.items() if k.startswith("weights.")}


def test_streamed_safetensors_equals_in_memory_conversion(tmp_path, bf16_state):
    src = tmp_path / "in.safetensors"
    save_file(bf16_state, str(src))
    dst = tmp_path / "out.safetensors"
    counts = quantize_file(src, dst)
    written = load_file(str(dst))
    expected = quantize_state_dict(bf16_state)
    assert set(written) == set(expected) and counts["tensors_out"] == len(expected) == 126
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype, key
        assert torch.equal(written[key], tensor), key
    specs = read_tensor_specs(dst)  # the header-only reader agrees too
    assert specs["blocks.2.ffn.2.scale"].shape == (2, 4)
    assert specs["blocks.2.ffn.2.int8_weight"].dtype == torch.int8
    # and the .pth path gives the same tensors
    pth = tmp_path / "out.pth"
    quantize_file(src, pth)
    from_pth = torch.load(pth, weights_only=True)
    assert all(torch.equal(from_pth[k], v) for k, v in expected.items())


def test_plan_matches_conversion(bf16_state):
    plan = quantized_plan(bf16_state)
    converted = quantize_state_dict(bf16_state)
    assert [name for name, _, _ in plan] == list(converted)
    for name, shape, dtype in plan:
        assert (tuple(converted[name].shape), converted[name].dtype) == (shape, dtype), name


def test_writer_refuses_a_tensor_that_differs_from_its_header(tmp_path):
    plan = [("a", (2, 3), torch.float32)]
    with pytest.raises(RuntimeError, match="planned torch.float32"):
        write_safetensors_streaming(tmp_path / "x.safetensors", plan, lambda n: torch.zeros(3, 2))
    size = write_safetensors_streaming(
        tmp_path / "y.safetensors",
        [("a", (2, 3), torch.bfloat16), ("b", (), torch.int64)],
        lambda n: torch.ones(2, 3, dtype=torch.bfloat16) if n == "a" else torch.tensor(7),
    )
    back = load_file(str(tmp_path / "y.safetensors"))
    assert torch.equal(back["a"], torch.ones(2, 3, dtype=torch.bfloat16))
    assert back["b"].item() == 7 and size == (tmp_path / "y.safetensors").stat().st_size


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_failed_conversion_leaves_no_partial_file(tmp_path, bf16_state, monkeypatch, suffix):
    import turbowan.quant.quantize as quantize_module

    src = tmp_path / "in.safetensors"
    save_file(bf16_state, str(src))
    calls = []
    real_quantize = quantize_module.quantize_blockwise

    def fail_on_third_layer(weight):
        calls.append(weight.shape)
        if len(calls) == 3:
            raise MemoryError("simulated: out of memory on the third layer")
        return real_quantize(weight)

    monkeypatch.setattr(quantize_module, "quantize_blockwise", fail_on_third_layer)
    dst = tmp_path / ("out" + suffix)
    with pytest.raises(MemoryError, match="third layer"):
        quantize_file(src, dst)
    assert len(calls) == 3  # it failed part-way, after the file was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
