"""`turbowan manifest`, `turbowan check` and `turbowan quantize` as a user runs them."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan.cli import check, manifest, quantize

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"
PROJ_L = "self_attn.attn_op.local_attn.proj_l"


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run one of this package's subcommands through its own parser, as main() does."""
    parser = argparse.ArgumentParser(prog="turbowan")
    sub = parser.add_subparsers(dest="command")
    for module in (manifest, check, quantize):
        module.add_parser(sub)
    args = parser.parse_args(list(argv))
    module = {"manifest": manifest, "check": check, "quantize": quantize}[args.command]
    code = module.run(args)
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    g = load_file(str(GOLDEN))
    sd = {k[8:]: v.to(torch.bfloat16) for k, v in g.items() if k.startswith("weights.")}
    for i in range(3):
        sd[f"blocks.{i}.{PROJ_L}.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)
        sd[f"blocks.{i}.{PROJ_L}.bias"] = torch.zeros(128, dtype=torch.bfloat16)
    bf16 = root / "tiny.safetensors"
    save_file(sd, str(bf16))
    return {"bf16": bf16, "root": root}


def test_manifest_a14b_json(capsys):
    code, out = cli(capsys, "manifest", "--preset", "wan2.2-i2v-a14b", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["num_tensors"] == 1575
    assert data["options"] == {"quant": "int8", "attention": "sla"}  # defaults made explicit
    assert data["bytes"] == 14_534_092_928  # spec §2.5: about 14.5 GB per int8 expert
    assert data["tensors"]["blocks.39.ffn.2.scale"] == {"shape": [40, 108], "dtype": "float32"}
    assert data["tensors"]["blocks.0.self_attn.q.int8_weight"]["dtype"] == "int8"
    code, out = cli(
        capsys,
        "manifest",
        "--preset",
        "wan2.2-i2v-a14b",
        "--quant",
        "none",
        "--attention",
        "original",
        "--json",
    )
    data = json.loads(out)
    assert data["num_tensors"] == 1095 and data["num_elements"] == 14_288_901_184


def test_manifest_table(capsys):
    code, out = cli(capsys, "manifest", "--preset", "tiny", "--quant", "none")
    assert code == 0
    lines = out.strip().splitlines()
    assert any(line.split()[:2] == ["blocks.2.ffn.0.weight", "(512,"] for line in lines)
    assert lines[-1].startswith("# tiny (attention=sla, quant=none): 102 tensors")


def test_manifest_unknown_preset(capsys):
    code, out = cli(capsys, "manifest", "--preset", "wan2.1-14b")
    assert code == 2
    assert "unknown preset 'wan2.1-14b'" in out and "wan2.2-i2v-a14b" in out


def test_check_good_file_autodetects(capsys, tiny_files):
    code, out = cli(capsys, "check", str(tiny_files["bf16"]))
    assert code == 0, out
    assert "matches preset 'tiny'" in out and "quant=none" in out and "attention=sla" in out
    code, out = cli(capsys, "check", str(tiny_files["bf16"]), "--preset", "tiny")
    assert code == 0, out


def test_check_truncated_file(capsys, tiny_files, tmp_path):
    data = tiny_files["bf16"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code, out = cli(capsys, "check", str(cut))
    assert code == 2
    assert "truncated" in out and "re-download" in out
    torch.save({"a": torch.zeros(1000)}, tmp_path / "full.pth")
    raw = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    code, out = cli(capsys, "check", str(tmp_path / "cut.pth"))
    assert code == 2 and "cannot read the file" in out and "truncated or corrupt" in out


def test_check_wrong_preset(capsys, tiny_files):
    code, out = cli(capsys, "check", str(tiny_files["bf16"]), "--preset", "wan2.2-i2v-a14b")
    assert code == 1
    assert "does NOT match preset 'wan2.2-i2v-a14b'" in out
    assert "wrong shape (expected -> in file) (first 10 of " in out
    assert "blocks.0.cross_attn.k.bias: [5120] -> [256]" in out
    assert "missing keys (first 10 of" in out  # blocks 3..39
    assert "the file looks like: preset 'tiny'" in out


def test_check_wrong_quant(capsys, tiny_files):
    quant = tiny_files["root"] / "tiny-quant.pth"
    code, out = cli(capsys, "quantize", str(tiny_files["bf16"]), str(quant))
    assert code == 0 and "30 linears quantised" in out
    code, out = cli(capsys, "check", str(quant), "--preset", "tiny", "--quant", "none")
    assert code == 1
    assert "30 missing, 60 unexpected, 0 wrong shape" in out
    assert "blocks.0.self_attn.q.weight" in out and "blocks.0.cross_attn.k.int8_weight" in out
    assert "fix: the file is --preset tiny --quant int8 --attention sla" in out
    assert "looks like: preset 'tiny'" in out and "quant=int8" in out
    code, out = cli(capsys, "check", str(quant))
    assert code == 0 and "quant=int8" in out
    code, out = cli(capsys, "check", str(quant), "--json", "--preset", "tiny", "--quant", "none")
    report = json.loads(out)
    assert report["ok"] is False and len(report["missing"]) == 30


def test_check_original_accepts_proj_l(capsys, tiny_files):
    code, out = cli(capsys, "check", str(tiny_files["bf16"]), "--attention", "original")
    assert code == 0, out
    assert "6 keys are accepted and ignored" in out


def test_quantize_errors(capsys, tiny_files):
    quant = tiny_files["root"] / "again.pth"
    code, out = cli(capsys, "quantize", str(tiny_files["bf16"]), str(tiny_files["root"] / "x.ckpt"))
    assert code == 2 and "unknown output format" in out
    code, out = cli(capsys, "quantize", str(tiny_files["root"] / "nope.pth"), str(quant))
    assert code == 2 and "no such file" in out
