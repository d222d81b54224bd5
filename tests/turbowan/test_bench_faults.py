"""turbowan-bench fails before measuring on bad outputs or strategy options, and Ctrl-C keeps
the partial JSON without a traceback (a real process, forked from the tests' server)."""

from __future__ import annotations

import json
import signal

from process_server import run_cli

from turbowan.bench import cli

TINY = ["--preset", "tiny", "--attention", "original", "--tokens", "16", "--steps", "1",
        "--warmup", "0", "--no-resident-between"]


def test_uncreatable_json_path_fails_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main([*TINY, "--strategies", "layerwise", "--json", str(blocker / "out.json")]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and "is a file, not a directory" in captured.err
    assert "copy:" not in captured.out  # not even the bandwidth was measured
    assert cli.main(["--plan", "--json", str(blocker / "plan.json")]) == 2


def test_named_strategy_without_its_options_is_refused(capsys):
    assert cli.main([*TINY, "--strategies", "layerwise,manual"]) == 2
    err = capsys.readouterr().err
    assert "--strategies manual: strategy 'manual' needs exactly one of resident=" in err
    assert "--option manual.resident=0,3" in err


def test_ctrl_c_keeps_the_partial_json_without_a_traceback(server, tmp_path):
    """Ctrl-C inside a block of the first strategy's offloaded forward (the gate holds it
    there): the partial JSON (the resident run) is kept and named, no traceback."""
    out = tmp_path / "sweep.json"
    argv = [*TINY, "--strategies", "layerwise,adaptive", "--paired", "off", "--json", str(out)]
    rc, err, _ = run_cli(server, tmp_path, argv, program="turbowan-bench",
                         gate="bench-offloaded", send=signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err
    assert f"interrupted; the runs measured so far are in {out}" in err
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and [r["strategy"] for r in doc["runs"]] == ["resident"]
