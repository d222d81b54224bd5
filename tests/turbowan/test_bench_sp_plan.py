"""`turbowan-bench --plan --sp`: Ulysses per-rank predictions from the A14B's shapes."""

from __future__ import annotations

import json

from turbowan.bench import cli


def test_sp_plan_bytes_memory_and_speedup(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["--plan", "--gpu", "24GB", "--strategies", "adaptive", "--bandwidth", "25",
                     "--block-ms", "340", "--sp", "2,3,4,8", "--link-bandwidth", "100",
                     "--json", str(out)]) == 0
    assert "Ulysses sequence parallel (adaptive, all-to-all at 100 GB/s" in capsys.readouterr().out
    doc = json.loads(out.read_text())["sequence_parallel"]
    rows = {r["sp"]: r for r in doc["rows"]}
    assert sorted(rows) == [1, 2, 3, 4, 8]  # sp=1 added: the speed-up is against it
    assert rows[3]["note"] == "3 does not divide the 40 heads"
    # 480p 16:9 81 frames: 32,760 tokens; 128-token chunks of 16,384 / 8,192 / 4,096
    assert [rows[n]["tokens_per_rank"] for n in (1, 2, 4, 8)] == [32760, 16384, 8192, 4096]
    # q, k, v and the output, bf16, the (N-1)/N that leaves the rank: 320 / 240 / 140 MiB
    assert [rows[n]["all_to_all_bytes_per_block"] / 2**20 for n in (2, 4, 8)] == [320, 240, 140]
    host = rows[1]["host_bytes_per_node"]
    assert [rows[n]["host_bytes_per_node"] for n in (2, 4, 8)] == [2 * host, 4 * host, 8 * host]
    # --home shared: one copy of the blocks per node, each process only its non-block tensors
    shared = [rows[n]["host_bytes_per_node_shared"] for n in (1, 2, 4, 8)]
    per_process = shared[1] - shared[0]
    assert shared[0] == host and 0 < per_process < host / 20
    assert shared[3] == shared[0] + 7 * per_process
    assert 26 * 2**30 < host < 28 * 2**30 and shared[3] < 34 * 2**30  # 8 GPUs: 33 GiB, not 217
    peaks = [rows[n]["predicted_peak_bytes"] for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)  # fewer tokens per rank, less activation
    assert all(r["predicted_peak_bytes"] <= 24 * 2**30 for r in rows.values() if "note" not in r)
    # all resident: a step is 40 blocks of 340 ms / N plus the all-to-all at 100 GB/s
    expect = 40 * (0.34 / 8 + rows[8]["all_to_all_bytes_per_block"] / 100e9)
    assert abs(rows[8]["predicted_seconds_per_step"] - expect) < 1e-9
    assert 1 < rows[8]["predicted_speedup"] < 8
