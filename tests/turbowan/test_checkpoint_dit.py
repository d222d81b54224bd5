"""Tiny DiT checkpoints written in each real format load and run; unsafe or mismatched
files are refused with a readable report."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import turbowan.dit.attention
from turbowan import load_dit
from turbowan.checkpoint.io import CheckpointReadError
from turbowan.checkpoint.report import CheckpointMismatchError
from turbowan.dit.config import PROJ_L
from turbowan.quant.int8_linear import Int8Linear, quantize_blockwise
from turbowan.quant.quantize import quantize_file, quantize_state_dict

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"
NORMS = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")


def real_format_state() -> dict[str, torch.Tensor]:
    """The golden tiny weights laid out like a real TurboWan file: bf16, fp32 norms, proj_l."""
    g = load_file(str(GOLDEN))
    sd = {k[8:]: v.to(torch.bfloat16) for k, v in g.items() if k.startswith("weights.")}
    for k in sd:
        if k.endswith(NORMS):
            sd[k] = sd[k].float()
    gen = torch.Generator().manual_seed(11)
    for i in range(3):
        sd[f"blocks.{i}.{PROJ_L}.weight"] = (torch.randn(128, 128, generator=gen) / 8).bfloat16()
        sd[f"blocks.{i}.{PROJ_L}.bias"] = (torch.randn(128, generator=gen) * 0.1).bfloat16()
    return sd


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def files(tmp_path_factory, golden):
    root = tmp_path_factory.mktemp("dit_ckpt")
    sd = real_format_state()
    paths = {"pth_bf16": root / "tiny.pth", "st_bf16": root / "tiny.safetensors"}
    torch.save(sd, paths["pth_bf16"])
    save_file(sd, str(paths["st_bf16"]))
    paths["pth_quant"] = root / "tiny-quant.pth"
    quantize_file(paths["pth_bf16"], paths["pth_quant"])
    return paths


def _run(model, g):
    with torch.no_grad():
        return model(
            g["inputs.x_B_C_T_H_W"],
            g["inputs.timesteps_B_T"].reshape(1),
            g["inputs.crossattn_emb"],
            g["inputs.y_B_C_T_H_W"],
        )


def _load_original(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_dit(path, attention="original", **kw)
    return model, [w for w in caught if "proj_l" in str(w.message)]


def _rel_rms(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_bf16_pth_and_safetensors_load_identically(files, golden):
    from_pth, warned = _load_original(files["pth_bf16"], dtype=torch.float32)
    assert len(warned) == 1  # ONE warning for the 3 blocks' proj_l, not one per tensor
    assert "ignoring 6 SLA proj_l tensors" in str(warned[0].message)
    from_st, _ = _load_original(files["st_bf16"], dtype=torch.float32)
    out_pth, out_st = _run(from_pth, golden), _run(from_st, golden)
    assert torch.equal(out_pth, out_st)
    # bf16-rounded weights stay close to the fp16-exact golden run
    assert _rel_rms(out_pth, golden["output"]) < 0.02
    assert from_pth.blocks[0].self_attn.norm_q.weight.dtype == torch.float32


def test_default_dtype_is_the_files(files, golden):
    model, _ = _load_original(files["pth_bf16"])
    assert model.compute_dtype == torch.bfloat16
    out = _run(model, golden)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel_rms(out, golden["output"]) < 0.05


def test_quant_pth_loads_and_round_trips(files, golden):
    written = torch.load(files["pth_quant"], weights_only=True)
    assert len(written) == 15 + 39 * 3  # the tiny analogue of 1,575
    assert written["blocks.1.ffn.0.int8_weight"].dtype == torch.int8
    assert written["blocks.1.ffn.0.scale"].shape == (4, 2)
    assert f"blocks.1.{PROJ_L}.weight" in written and "blocks.1.ffn.0.weight" not in written
    assert written["text_embedding.0.weight"].dtype == torch.bfloat16  # not quantised

    model, warned = _load_original(files["pth_quant"], dtype=torch.float32)
    assert len(warned) == 1 and model.quant == "int8"
    layer = model.blocks[1].ffn[0]
    assert isinstance(layer, Int8Linear)
    q, scale = quantize_blockwise(real_format_state()["blocks.1.ffn.0.weight"])
    assert torch.equal(layer.int8_weight, q) and torch.equal(layer.scale, scale)

    bf16_model, _ = _load_original(files["pth_bf16"], dtype=torch.float32)
    ref = _run(bf16_model, golden)
    fast = _run(model, golden)
    assert 0 < _rel_rms(fast, ref) < 0.03
    ref_path, _ = _load_original(files["pth_quant"], dtype=torch.float32, int8_mode="reference")
    assert 0 < _rel_rms(_run(ref_path, golden), ref) < 0.03


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc maps")
@pytest.mark.parametrize("kind,attr", [("pth_quant", "int8_weight"), ("st_bf16", "weight")])
def test_tensors_stay_memory_mapped(files, kind, attr):
    model, _ = _load_original(files[kind], dtype=torch.bfloat16)
    ptr = getattr(model.blocks[2].ffn[2], attr).data_ptr()
    mapped = None
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ptr < hi:
            mapped = rest[-1] if len(rest) >= 5 else None
    assert mapped == str(files[kind])  # assigned in place: no second copy in RAM


class _Payload:
    """Unpickling this would create a file (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pth_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    sd = {"patch_embedding.weight": torch.zeros(4, 4), "payload": _Payload(marker)}
    with evil.open("wb") as fh:
        torch.save(sd, fh)
    with pytest.raises(CheckpointReadError, match="weights_only"):
        load_dit(evil)
    assert not marker.exists()
    from turbowan.checkpoint.report import check_against_preset

    with pytest.raises(CheckpointReadError):
        check_against_preset(evil)
    assert not marker.exists()
    # the payload is live: an unsafe loader would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_missing_and_wrong_shape_keys_give_a_report(tmp_path):
    sd = real_format_state()
    del sd["blocks.1.cross_attn.k.weight"]
    sd["blocks.2.ffn.2.bias"] = torch.zeros(7, dtype=torch.bfloat16)
    sd["blocks.0.extra"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_dit(path, attention="sla")
    text = str(info.value)
    report = info.value.report
    assert report.missing == ["blocks.1.cross_attn.k.weight"]
    assert report.unexpected == ["blocks.0.extra"]
    assert report.wrong_shape == [("blocks.2.ffn.2.bias", (256,), (7,))]
    assert "1 missing, 1 unexpected, 1 wrong shape, 0 wrong dtype" in text
    assert "preset 'tiny'" in text and "quant=none" in text


def test_bad_arguments_fail_before_reading(tmp_path):
    missing = tmp_path / "nothing.pth"
    with pytest.raises(ValueError, match="unknown attention .flash.; choose one of sla, original, sagesla"):
        load_dit(missing, attention="flash")
    with pytest.raises(ValueError, match="sla_topk"):
        load_dit(missing, sla_topk=0.0)
    with pytest.raises(CheckpointReadError, match="no such file"):
        load_dit(missing)


def test_sla_needs_proj_l(tmp_path):
    sd = {k: v for k, v in real_format_state().items() if PROJ_L not in k}
    path = tmp_path / "no_sla.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="use attention='original'"):
        load_dit(path, attention="sla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no proj_l -> nothing to ignore, no warning
        model = load_dit(path, attention="original", dtype=torch.float32)
    assert model.attention == "original"


def test_sla_attention_calls_the_op_with_proj_l(files, golden, monkeypatch):
    calls = []

    def fake_sla(q, k, v, *, topk, block_q, block_k, proj_weight, proj_bias):
        calls.append((q.shape, topk, block_q, block_k, proj_weight, proj_bias))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    monkeypatch.setattr(turbowan.dit.attention, "sla_forward", fake_sla)
    sla_model = load_dit(files["pth_bf16"], attention="sla", sla_topk=0.25, dtype=torch.float32)
    out = _run(sla_model, golden)
    assert len(calls) == 3
    shape, topk, bq, bk, w, b = calls[1]
    assert shape == (1, 72, 2, 128) and (topk, bq, bk) == (0.25, 128, 64)
    assert w is sla_model.blocks[1].self_attn.attn_op.local_attn.proj_l.weight
    assert w.shape == (128, 128) and b.shape == (128,)
    # the fake op is dense attention, so the result equals the `original` model's
    dense, _ = _load_original(files["pth_bf16"], dtype=torch.float32)
    torch.testing.assert_close(out, _run(dense, golden), rtol=0, atol=0)


def test_detect_layout_from_header(files):
    from turbowan.dit.loading import detect_layout

    quant = detect_layout(files["pth_quant"])
    assert (quant.quant, quant.attention, quant.preset_name()) == ("int8", "sla", "tiny")
    plain = detect_layout(files["st_bf16"])
    assert (plain.quant, plain.config.num_layers, plain.config.ffn_dim) == ("none", 3, 512)


def test_quantize_refuses_quantized_input(files):
    quant = torch.load(files["pth_quant"], weights_only=True)
    with pytest.raises(ValueError, match="already int8"):
        quantize_state_dict(quant)


def test_quantize_to_safetensors_and_checkpoint_wrapper_prefix(tmp_path, golden):
    sd = {
        f"net.{k.replace('self_attn.', 'self_attn._checkpoint_wrapped_module.')}": v
        for k, v in real_format_state().items()
    }
    src = tmp_path / "wrapped.pth"
    torch.save(sd, src)
    dst = tmp_path / "q.safetensors"
    counts = quantize_file(src, dst)
    assert counts["quantized_layers"] == 30
    model = load_dit(dst, attention="sla", dtype=torch.float32)
    assert model.quant == "int8" and len(model.blocks) == 3
    with pytest.raises(FileExistsError, match="--force"):
        quantize_file(src, dst)


def test_triton_int8_mode_without_cuda_is_refused_at_load(files, monkeypatch):
    import turbowan.quant.int8_triton as int8_triton

    monkeypatch.setattr(int8_triton, "INTERPRETED", False)  # as on a plain CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*mode='fast'"):
        load_dit(files["pth_quant"], int8_mode="triton")
