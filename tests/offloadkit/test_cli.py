"""`offloadkit list` and `offloadkit probe`, in-process and once through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offloadkit
from offloadkit.cli import main
from offloadkit.probe import probe

BUILTINS = ("adaptive", "chunkwise", "comfy_native", "cpu_only", "layerwise")


pytestmark = pytest.mark.usefixtures("fresh_registry")


def test_list_prints_name_plugin_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STRATEGY", "PLUGIN", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == offloadkit.list_strategies()
    for name in BUILTINS:
        assert "offloadkit (built-in)" in rows[name]
        assert offloadkit.get_strategy(name).description.splitlines()[0] in rows[name]
    if "manual" in rows:
        assert "manual (offloadkit-manual)" in rows["manual"]


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in payload["strategies"]] == offloadkit.list_strategies()
    by_name = {s["name"]: s for s in payload["strategies"]}
    assert by_name["layerwise"] == {
        "name": "layerwise",
        "plugin": "layerwise",
        "distribution": "offloadkit",
        "builtin": True,
        "description": offloadkit.get_strategy("layerwise").description.splitlines()[0],
    }
    assert payload["failed_plugins"] == []


def test_list_reports_a_broken_plugin_on_stderr_and_still_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = tmp_path / "offloadkit_cracked-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: offloadkit-cracked\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text("[offloadkit]\ncracked = okt_cli_cracked_xyz\n")
    (tmp_path / "okt_cli_cracked_xyz.py").write_text("raise ImportError('old API')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["list", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert set(BUILTINS) <= {s["name"] for s in payload["strategies"]}
    assert payload["failed_plugins"] == [
        {"plugin": "cracked", "distribution": "offloadkit-cracked", "error": "ImportError: old API"}
    ]
    assert "warning: offloadkit plugin 'cracked'" in captured.err
    sys.modules.pop("okt_cli_cracked_xyz", None)


def test_probe_cpu_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--device", "cpu", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["device"] == "cpu" and entry["source"] == "os"
    assert entry["total_bytes"] == probe("cpu").total_bytes
    assert 0 < entry["free_bytes"] <= entry["total_bytes"]


def test_probe_table_lists_host_ram_and_every_cuda_device(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["probe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE", "NAME", "TOTAL", "FREE", "SOURCE"]
    devices = [line.split()[0] for line in lines[1:]]
    assert devices == ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert "host RAM" in lines[1] and lines[1].rstrip().endswith("os")
    assert "GiB" in lines[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_probe_cuda_without_cuda_exits_1_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["probe", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "offloadkit: error: device 'cuda' was requested but CUDA is not available"
    )


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_console_script_is_installed_and_runs() -> None:
    script = Path(sys.executable).with_name("offloadkit")
    assert script.exists(), "console script missing: pip install -e packages/offloadkit"
    result = subprocess.run(
        [str(script), "list", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    names = [s["name"] for s in json.loads(result.stdout)["strategies"]]
    assert set(BUILTINS) <= set(names)
