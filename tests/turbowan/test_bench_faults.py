"""turbowan-bench fails before measuring on bad outputs or strategy options, and Ctrl-C keeps
the partial JSON without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def test_ctrl_c_keeps_the_partial_json_without_a_traceback(tmp_path):
    out = tmp_path / "sweep.json"
    argv = [*TINY, "--steps", "2", "--strategies", "layerwise,chunkwise,adaptive",
            "--budgets", "40%,55%,70%,85%,100%", "--home", "host,disk", "--json", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "turbowan.bench.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 240
    while not out.exists():  # written after the first measured run
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"interrupted; the runs measured so far are in {out}" in err
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and len(doc["runs"]) >= 1
