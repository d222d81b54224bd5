"""load_text_encoder on tiny checkpoints written here in each real format, and bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

import turbowan
from turbowan.text_encoder import loading
from turbowan.text_encoder.config import TextEncoderMismatchError
from turbowan.text_encoder.fp8 import ScaledFP8Linear
from turbowan.text_encoder.naming import wan_to_comfy
from turbowan.text_encoder.tokenizer import (
    EOS_ID,
    MissingTokenizerError,
    PromptTruncatedWarning,
    UMT5Tokenizer,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "umt5_tiny.safetensors"
TOL = dict(atol=1e-5, rtol=1e-5)
FP8 = torch.float8_e4m3fn
LINEAR_SUFFIXES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def weights(golden) -> dict[str, torch.Tensor]:
    """The golden tiny encoder's weights, upstream (wan) names, float32."""
    return {k[len("weights."):]: v for k, v in golden.items() if k.startswith("weights.")}


@pytest.fixture(scope="module")
def spiece_bytes() -> bytes:
    buffer = io.BytesIO()
    corpus = [f"{a} {b} under {c}" for a in ("a red", "the blue", "one tall", "old")
              for b in ("boat", "bird", "tower", "lamp", "wolf") for c in ("snow", "stars", "fog")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=120, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture()
def pth_dir(tmp_path, weights, spiece_bytes) -> Path:
    """Upstream layout: the .pth plus google/umt5-xxl/spiece.model beside it."""
    torch.save(weights, tmp_path / "models_t5_umt5-tiny-enc.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_bytes)
    return tmp_path


def quantize_fp8_scaled(
    weights: dict[str, torch.Tensor], *, embedding_too: bool = False
) -> dict[str, torch.Tensor]:
    """ComfyUI fp8_scaled layout: fp8 linears + scalar fp32 scale_weight, comfy names, marker."""
    out: dict[str, torch.Tensor] = {}
    targets = LINEAR_SUFFIXES + (("token_embedding",) if embedding_too else ())
    for key, value in weights.items():
        module = key.rpartition(".")[0]
        if module.endswith(targets):
            scale = value.abs().max().float() / torch.finfo(FP8).max
            out[key] = (value / scale).to(FP8)
            out[f"{module}.scale_weight"] = scale.reshape(())
        else:
            out[key] = value.to(torch.bfloat16)
    comfy = wan_to_comfy(out)
    comfy["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return comfy


def dequantized_reference(comfy_fp8: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ref = {}
    for key, value in comfy_fp8.items():
        if key.endswith(".scale_weight") or key == "scaled_fp8":
            continue
        scale = comfy_fp8.get(key.replace(".weight", ".scale_weight"))
        ref[key] = value.float() * scale if scale is not None else value.float()
    return ref


def run_golden(encoder, golden) -> torch.Tensor:
    with torch.no_grad():
        return encoder(golden["inputs.ids"], golden["inputs.mask"])


def test_upstream_pth_fp32_reproduces_golden_and_finds_tokenizer(pth_dir, golden, spiece_bytes):
    enc = turbowan.load_text_encoder(pth_dir / "models_t5_umt5-tiny-enc.pth")
    assert enc.config.dim == 64 and enc.config.num_layers == 2 and enc.config.vocab_size == 512
    assert enc.model.token_embedding.weight.dtype == torch.float32
    torch.testing.assert_close(run_golden(enc, golden), golden["output"], **TOL)
    assert enc.tokenizer is not None and "google/umt5-xxl" in enc.tokenizer.source
    # end to end with the real SentencePiece path: prompts -> (B, 512, D), rows after EOS zeroed
    sp = spm.SentencePieceProcessor(model_proto=spiece_bytes)
    out = enc.encode(["a red   boat under snow", ""])
    assert out.shape == (2, 512, 64)
    n = len(sp.encode("a red boat under snow")) + 1
    ids, mask = enc.tokenize(["a red boat under snow"])
    assert ids[0, n - 1] == EOS_ID and mask.sum() == n
    with torch.no_grad():
        bare = enc(ids, mask)
    torch.testing.assert_close(out[0, :n], bare[0, :n], atol=0, rtol=0)
    assert torch.count_nonzero(out[0, n:]) == 0
    assert torch.count_nonzero(out[1, 1:]) == 0 and out[1, 0].abs().sum() > 0  # EOS row only


def test_masked_padding_does_not_change_real_rows(pth_dir):
    """The key mask must hide padding: 512 vs 24 positions give the same real rows."""
    path = pth_dir / "models_t5_umt5-tiny-enc.pth"
    long = loading.load_text_encoder(path).encode(["one tall wolf under stars"])
    short = loading.load_text_encoder(path, text_len=24).encode(["one tall wolf under stars"])
    assert short.shape == (1, 24, 64)
    torch.testing.assert_close(long[:, :24], short, **TOL)


def test_upstream_pth_bf16_loads_in_bf16_within_its_tolerance(tmp_path, weights, golden):
    bf16 = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    path = tmp_path / "enc-bf16.pth"
    torch.save(bf16, path)
    enc = loading.load_text_encoder(path, tokenizer=False)
    assert enc.model.blocks[0].attn.q.weight.dtype == torch.bfloat16
    out = run_golden(enc, golden).float()
    ref = golden["output"]
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    # the same file computed in fp32 equals the fp32 math on the bf16-rounded weights
    enc32 = loading.load_text_encoder(path, tokenizer=False, dtype="float32")
    ref32 = loading.UMT5Encoder(enc.config)
    ref32.load_state_dict({k: v.float() for k, v in bf16.items()})
    with torch.no_grad():
        torch.testing.assert_close(run_golden(enc32, golden), ref32.eval()(golden["inputs.ids"], golden["inputs.mask"]), **TOL)


@pytest.mark.parametrize("fp8_mode", ["dequantize", "per_layer"])
def test_comfy_fp8_scaled_safetensors(tmp_path, weights, golden, spiece_bytes, fp8_mode):
    comfy = quantize_fp8_scaled(weights)
    comfy["encoder.embed_tokens.weight"] = comfy["shared.weight"].clone()  # optional duplicate
    comfy["spiece_model"] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    path = tmp_path / "umt5_tiny_fp8_e4m3fn_scaled.safetensors"
    save_file(comfy, str(path))

    enc = loading.load_text_encoder(path, dtype=torch.float32, fp8=fp8_mode)
    assert "spiece_model" in enc.tokenizer.source  # the embedded tokenizer was used
    q = enc.model.blocks[1].attn.q
    if fp8_mode == "per_layer":
        assert isinstance(q, ScaledFP8Linear) and q.weight.dtype == FP8
    else:
        assert isinstance(q, torch.nn.Linear) and q.weight.dtype == torch.float32
    # exact float reference: the fp32 model on the dequantised weights
    ref = loading.UMT5Encoder(enc.config)
    ref.load_state_dict(loading.to_wan_names(dequantized_reference(comfy))[0], strict=True)
    ref.eval()
    with torch.no_grad():
        expected = ref(golden["inputs.ids"], golden["inputs.mask"])
    torch.testing.assert_close(run_golden(enc, golden), expected, **TOL)
    # and near the unquantised golden: e4m3 keeps 3 mantissa bits, per-tensor scales on these
    # random weights give cosine 0.988 here; a wrong scale or layout gives far less
    out, gold = run_golden(enc, golden), golden["output"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), gold.flatten(), dim=0) > 0.98
    assert enc.encode(["the blue bird under fog"]).shape == (1, 512, 64)  # always 512 rows


@pytest.mark.parametrize("fp8_mode", ["dequantize", "per_layer"])
def test_fp8_scaled_embedding_is_dequantised_in_both_modes(tmp_path, weights, golden, fp8_mode):
    comfy = quantize_fp8_scaled(weights, embedding_too=True)
    assert comfy["shared.weight"].dtype == FP8 and "shared.scale_weight" in comfy
    path = tmp_path / "fp8_embed.safetensors"
    save_file(comfy, str(path))
    enc = loading.load_text_encoder(path, tokenizer=False, dtype="fp32", fp8=fp8_mode)
    embedding = enc.model.token_embedding.weight
    assert embedding.dtype == torch.float32
    expected = comfy["shared.weight"].float() * comfy["shared.scale_weight"]
    assert torch.equal(embedding, expected)
    out = run_golden(enc, golden)
    assert torch.nn.functional.cosine_similarity(out.flatten(), golden["output"].flatten(), dim=0) > 0.98


def test_turbowan_check_recognises_the_written_formats(tmp_path, weights):
    from turbowan.checkpoint.report import check_against_preset

    fp8_path = tmp_path / "fp8.safetensors"
    save_file(quantize_fp8_scaled(weights), str(fp8_path))
    pth_path = tmp_path / "enc.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in weights.items()}, pth_path)
    fp8_report = check_against_preset(fp8_path)
    assert fp8_report.ok and fp8_report.looks_like == "preset 'umt5-tiny' (fp8=scaled, naming=comfy)"
    pth_report = check_against_preset(pth_path)
    assert pth_report.ok and pth_report.looks_like == "preset 'umt5-tiny' (naming=wan)"
    wrong = check_against_preset(pth_path, preset="umt5-xxl", naming="wan")
    assert not wrong.ok and len(wrong.wrong_shape) == 22 and len(wrong.missing) == 220


def test_same_dtype_tensors_are_not_copied():
    """A bf16 file loaded in bf16 keeps the file's (memory-mapped) tensors: no second copy."""
    from turbowan.text_encoder.fp8 import dequantize_scaled

    state = {"a.weight": torch.ones(4, 4, dtype=torch.bfloat16), "n.weight": torch.ones(4)}
    out = dequantize_scaled(dict(state), torch.bfloat16)
    assert out["a.weight"] is state["a.weight"]
    assert out["n.weight"].dtype == torch.bfloat16


def test_fp8_defaults_to_bf16_compute(tmp_path, weights, golden):
    path = tmp_path / "fp8.safetensors"
    save_file(quantize_fp8_scaled(weights), str(path))
    enc = loading.load_text_encoder(path, tokenizer=False)
    assert enc.model.blocks[0].ffn.fc2.weight.dtype == torch.bfloat16
    out = run_golden(enc, golden).float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), golden["output"].flatten(), dim=0) > 0.98


def test_comfy_names_with_wrapper_prefix_and_explicit_tokenizer(tmp_path, weights, golden, spiece_bytes):
    comfy = {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in wan_to_comfy(weights).items()}
    path = tmp_path / "te.safetensors"
    save_file(comfy, str(path))
    sp_path = tmp_path / "elsewhere.model"
    sp_path.write_bytes(spiece_bytes)
    enc = loading.load_text_encoder(path, tokenizer=sp_path)
    torch.testing.assert_close(run_golden(enc, golden), golden["output"], **TOL)
    assert enc.tokenizer.source == str(sp_path)


def test_missing_tokenizer_fails_before_weights_are_read(tmp_path, weights, monkeypatch):
    path = tmp_path / "te.safetensors"
    save_file(wan_to_comfy(weights), str(path))

    def no_weight_reads(*_a, **_k):
        raise AssertionError("weights were read before the tokenizer check")

    monkeypatch.setattr(loading, "load_state_dict", no_weight_reads)
    with pytest.raises(MissingTokenizerError) as err:
        loading.load_text_encoder(path)
    message = str(err.value)
    for needle in ("google/umt5-xxl", "spiece.model", "tokenizer.json", "tokenizer=", "--tokenizer"):
        assert needle in message


def test_encoder_loaded_without_tokenizer_explains_on_encode(tmp_path, weights):
    path = tmp_path / "te.pth"
    torch.save(weights, path)
    enc = loading.load_text_encoder(path, tokenizer=False)
    with pytest.raises(MissingTokenizerError, match="forward\\(ids, mask\\).*google/umt5-xxl"):
        enc.encode(["a prompt"])


def test_long_prompt_warns_and_empty_prompt_is_eos_only(pth_dir):
    enc = loading.load_text_encoder(pth_dir / "models_t5_umt5-tiny-enc.pth")
    with pytest.warns(PromptTruncatedWarning, match="tokens were dropped"):
        out = enc.encode(["old lamp under stars " * 200])
    assert out.shape == (1, 512, 64) and torch.count_nonzero(out[0].abs().sum(-1)) == 512
    empty = enc.encode([""])
    assert torch.count_nonzero(empty[0].abs().sum(-1)) == 1


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, weights):
    path = tmp_path / "te.pth"
    torch.save(weights, path)
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(600)}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TextEncoderMismatchError, match="603 pieces.*only 512"):
        loading.load_text_encoder(path)


def test_clip_l_is_refused_with_widths(tmp_path):
    clip = {
        "text_model.embeddings.token_embedding.weight": torch.zeros(16, 768, dtype=torch.float16),
        "text_model.embeddings.position_embedding.weight": torch.zeros(77, 768, dtype=torch.float16),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(768, 768, dtype=torch.float16),
        "text_model.final_layer_norm.weight": torch.zeros(768, dtype=torch.float16),
    }
    path = tmp_path / "clip_l.safetensors"
    save_file(clip, str(path))
    with pytest.raises(TextEncoderMismatchError, match="width 768.*CLIP-L.*needs umT5-xxl, width 4096"):
        loading.load_text_encoder(path, tokenizer=False)


def test_t5_base_is_refused_with_widths(tmp_path):
    d, f = 768, 32
    t5 = {"shared.weight": torch.zeros(8, d), "encoder.final_layer_norm.weight": torch.zeros(d)}
    for i in range(2):
        p = f"encoder.block.{i}.layer."
        for n in "qkvo":
            t5[f"{p}0.SelfAttention.{n}.weight"] = torch.zeros(d, d)
        t5[f"{p}0.layer_norm.weight"] = torch.zeros(d)
        t5[f"{p}1.layer_norm.weight"] = torch.zeros(d)
        t5[f"{p}1.DenseReluDense.wi_0.weight"] = torch.zeros(f, d)
        t5[f"{p}1.DenseReluDense.wi_1.weight"] = torch.zeros(f, d)
        t5[f"{p}1.DenseReluDense.wo.weight"] = torch.zeros(d, f)
    t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 12)
    path = tmp_path / "t5_base.safetensors"
    save_file(t5, str(path))
    with pytest.raises(TextEncoderMismatchError, match="width 768.*needs umT5-xxl, width 4096"):
        loading.load_text_encoder(path, tokenizer=False)


def test_t5_shared_position_bias_is_refused(tmp_path, weights):
    t5_like = {k: v for k, v in weights.items() if k != "blocks.1.pos_embedding.embedding.weight"}
    path = tmp_path / "t5_like.pth"
    torch.save(t5_like, path)
    with pytest.raises(TextEncoderMismatchError, match=r"only block 0 has a relative position table.*T5 / T5 v1.1"):
        loading.load_text_encoder(path, tokenizer=False)


def test_incomplete_file_and_unknown_options(tmp_path, weights):
    path = tmp_path / "cut.pth"
    torch.save({k: v for k, v in weights.items() if k != "blocks.1.ffn.fc2.weight"}, path)
    with pytest.raises(TextEncoderMismatchError, match="missing 1 tensors.*blocks.1.ffn.fc2.weight"):
        loading.load_text_encoder(path, tokenizer=False)
    odd = dict(weights)
    odd["blocks.1.ffn.fc1.weight"] = torch.zeros(96, 64)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(TextEncoderMismatchError, match=r"1 of another shape.*fc1.weight \(96, 64\) \(expected \(128, 64\)\)"):
        loading.load_text_encoder(tmp_path / "odd.pth", tokenizer=False)
    with pytest.raises(ValueError, match="fp8='keep'"):
        loading.load_text_encoder(path, tokenizer=False, fp8="keep")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        loading.load_text_encoder(path, tokenizer=False, dtype="int8")


def test_explicit_tokenizer_object_and_demo(tmp_path, weights):
    path = tmp_path / "te.pth"
    torch.save(weights, path)
    demo = loading.load_text_encoder(path, tokenizer="demo", text_len=32)
    assert demo.tokenizer.source.endswith("demo_spiece.model")
    given = UMT5Tokenizer.from_file(demo.tokenizer.source, text_len=32)
    enc = loading.load_text_encoder(path, tokenizer=given, text_len=32)
    assert enc.tokenizer is given
    torch.testing.assert_close(enc.encode(["a fox"]), demo.encode(["a fox"]), atol=0, rtol=0)
