"""turbowan-bench: workload geometry, the pipeline simulator, plan arithmetic (predicted peak
== what the engine places), the JSON schema of a real tiny sweep, and CLI errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import offloadkit
from offloadkit.engine.profile import profile_model
from turbowan.bench import cli, plan, simulate, workload
from turbowan.bench.models import bench_inputs, build_bench_model
from turbowan.bench.plan import Card, meta_profile, plan_strategy_rows
from turbowan.bench.report import RUN_KEYS, SCHEMA
from turbowan.dit.config import get_preset

GiB = 2**30


# ------------------------------------------------------------------ workload


def test_video_workload_matches_spec_token_counts():
    w = workload.from_video("480p", "16:9", 81)
    assert w.latent_shape == (1, 16, 21, 60, 104)
    assert w.condition_shape == (1, 20, 21, 60, 104)
    assert w.tokens == 32_760
    assert workload.from_video("720p", "16:9", 81).tokens == 75_600
    assert workload.from_video("480", "1:1", 33).tokens == 8_100


def test_video_workload_rejects_frames_that_are_not_4n_plus_1():
    with pytest.raises(ValueError, match=r"--frames: .*4n\+1.*80; try 77 or 81"):
        workload.from_video("480p", "16:9", 80)
    with pytest.raises(ValueError, match="unknown --aspect-ratio"):
        workload.from_video("480p", "21:9", 81)


@pytest.mark.parametrize("tokens", [1, 7, 2048, 1560, 32_760])
def test_token_workload_has_exactly_the_requested_tokens(tokens):
    w = workload.from_tokens(tokens)
    assert w.tokens == tokens
    assert w.latent_height % 2 == 0 and w.latent_width % 2 == 0


# ------------------------------------------------------------------ simulator


def test_simulator_transfer_bound_timeline_is_exact():
    # 4 streamed blocks, 1 s compute, 2 s copy each, 2 slots, prefetch 1:
    # copies 0-2, 2-4, 4-6, 6-8; computes 2-3, 4-5, 6-7, 8-9 -> 9 s against 4 s resident.
    p = simulate.simulate_step(block_bytes=[2] * 4, block_seconds=[1.0] * 4,
                               streamed=[0, 1, 2, 3], bandwidth=1.0, slots=2, prefetch_depth=1)
    assert p.seconds == pytest.approx(9.0)
    assert p.stall_seconds == pytest.approx(5.0)
    assert p.slowdown == pytest.approx(9 / 4)
    assert p.bytes_moved == 8


def test_simulator_compute_bound_stream_costs_only_the_first_copy():
    p = simulate.simulate_step(block_bytes=[1] * 10, block_seconds=[1.0] * 10,
                               streamed=range(10), bandwidth=10.0, slots=2, prefetch_depth=1)
    assert p.seconds == pytest.approx(10.1)
    assert simulate.simulate_step(block_bytes=[1] * 10, block_seconds=[1.0] * 10, streamed=[],
                                  bandwidth=10.0).slowdown == 1.0


def test_simulator_units_that_each_own_a_slot_stay_put():
    p = simulate.simulate_step(block_bytes=[5] * 8, block_seconds=[1.0] * 8, streamed=range(8),
                               bandwidth=1.0, group_size=4, slots=2, prefetch_depth=1)
    assert p.slowdown == 1.0 and p.bytes_moved == 0


def test_simulator_interleaving_beats_a_streamed_tail():
    kwargs = dict(block_bytes=[3] * 8, block_seconds=[1.0] * 8, bandwidth=1.0, slots=2,
                  prefetch_depth=1)
    tail = simulate.simulate_step(streamed=[4, 5, 6, 7], **kwargs)
    spread = simulate.simulate_step(streamed=[1, 3, 5, 7], **kwargs)
    assert spread.seconds < tail.seconds


# ------------------------------------------------------------------ plan arithmetic

CARDS = [Card(label, gb * 2**30) for label, gb in
         [("8GB", 8), ("12GB", 12), ("16GB", 16), ("20GB", 20), ("24GB", 24), ("48GB", 48),
          ("80GB", 80)]]  # fmt: skip


def _expected_peak(profile, row) -> int:
    streamed = row["streamed_blocks"]
    return (profile.non_block_bytes + profile.bytes_of(row["resident_blocks"])
            + row["slots"] * profile.max_group_bytes(streamed, row["group_size"]))


def test_plan_a14b_every_card_peak_within_budget_and_adds_up():
    profile = meta_profile("wan2.2-i2v-a14b", quant="int8", attention="sla")
    assert profile.num_blocks == 40 and profile.max_block_bytes == 351_696_128
    strategies = ["adaptive", "layerwise", "chunkwise"]
    rows = plan_strategy_rows(profile, strategies, CARDS, reserve_bytes=5 * GiB,
                              bandwidth=25e9, block_seconds=0.3)
    assert len(rows) == len(CARDS) * len(strategies)
    planned = [r for r in rows if "predicted_peak_device_bytes" in r]
    for row in planned:
        assert row["predicted_peak_device_bytes"] <= row["budget_bytes"], row
        assert row["predicted_peak_device_bytes"] == _expected_peak(profile, row), row
        assert row["resident_count"] + row["streamed_count"] == 40
        assert row["predicted_slowdown"] >= 1.0
    layerwise = [r for r in rows if r["strategy"] == "layerwise"]
    assert all(r["resident_count"] == 0 and r["streamed_count"] == 40 for r in layerwise)
    adaptive = [r["resident_count"] for r in rows if r["strategy"] == "adaptive"]
    assert adaptive == sorted(adaptive) and adaptive[-1] == 40 and adaptive[0] < 40
    # an 8 GB card (8 GiB) less 5 GiB leaves 3 GiB: some resident blocks but not all
    assert 0 < adaptive[0] < 10


def test_card_labels_are_binary_sizes_as_gpus_are_sold():
    cards = plan.parse_cards("8GB, 24gb,80GiB,1TB,12000000000")
    assert [c.total_bytes for c in cards] == [8 * 2**30, 24 * 2**30, 80 * 2**30, 2**40,
                                              12_000_000_000]


def test_plan_mode_cli_prints_every_card_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["--plan", "--bandwidth", "25", "--block-ms", "300", "--strategies",
                   "adaptive,layerwise", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for card in ("8GB", "12GB", "16GB", "20GB", "24GB", "48GB", "80GB"):
        assert f"\n{card} " in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["mode"] == "plan"
    assert doc["workload"]["tokens"] == 32_760
    assert len(doc["plans"]) == 14
    assert doc["bandwidth_bytes_per_s"] == 25e9 and doc["block_seconds"] == pytest.approx(0.3)


def test_predicted_peak_is_what_adaptive_places_on_tiny():
    """Plan mode's row for a card (budget = card - reserve) is exactly what the engine then
    places when adaptive runs at that budget: predicted peak == measured peak <= budget."""
    model = build_bench_model("tiny", attention="original")
    inputs = bench_inputs(get_preset("tiny"), workload.from_tokens(16), dtype=torch.float32)
    profile = profile_model(model, device="cpu")
    floor = offloadkit.get_strategy("adaptive")().min_device_bytes(profile)
    reserve = 1000
    cards = [Card(f"card{i}", b + reserve) for i, b in
             enumerate([floor, floor + profile.max_block_bytes, profile.total_bytes])]
    rows = plan_strategy_rows(profile, ["adaptive", "layerwise"], cards, reserve_bytes=reserve,
                              bandwidth=1e9, block_seconds=0.01)
    residents = []
    fitted = [r for r in rows if "predicted_peak_device_bytes" in r]
    assert len(fitted) == 5  # layerwise needs two slots: it does not fit the smallest card
    for row in fitted:
        with offloadkit.offloaded(model, row["strategy"], device="cpu",
                                  budget=row["budget_bytes"]) as handle:
            with torch.inference_mode():
                model(inputs.x, inputs.t, inputs.context, inputs.y)
            stats = handle.stats()
        assert stats.peak_device_bytes == row["predicted_peak_device_bytes"] <= row["budget_bytes"]
        assert stats.resident_blocks == row["resident_count"]
        if row["strategy"] == "adaptive":
            residents.append(stats.resident_blocks)
    assert residents == sorted(residents) and residents[0] < residents[-1] == profile.num_blocks


def test_plan_small_meta_peaks_add_up():
    profile = meta_profile("small", quant="int8", attention="sla")
    cards = [Card(f"{m}MiB", m * 2**20) for m in (150, 200, 300, 400)]
    rows = plan_strategy_rows(profile, ["adaptive", "layerwise", "chunkwise"], cards,
                              reserve_bytes=0, bandwidth=5e9, block_seconds=0.5)
    planned = [r for r in rows if "predicted_peak_device_bytes" in r]
    assert len(planned) >= 8
    for row in planned:
        assert row["predicted_peak_device_bytes"] == _expected_peak(profile, row) <= row["budget_bytes"]


# ------------------------------------------------------------------ a real sweep


def test_tiny_sweep_json_schema(tmp_path):
    out, png, md = tmp_path / "sweep.json", tmp_path / "sweep.png", tmp_path / "sweep.md"
    rc = cli.main(["--preset", "tiny", "--attention", "original", "--tokens", "16",
                   "--strategies", "layerwise,cpu_only", "--budgets", "95%,100%",
                   "--plot", str(png), "--markdown", str(md),
                   "--home", "host,disk,shared", "--steps", "1", "--warmup", "0",
                   "--no-resident-between", "--peers", "accelerate_disk_offload",
                   "--json", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["complete"] is True
    for key in ("machine", "versions", "git", "rates", "workload", "model_bytes", "runs"):
        assert key in doc
    assert doc["versions"]["torch"] == torch.__version__
    # on the CPU nothing is page-locked: one memcpy rate, measured once for both
    assert doc["rates"]["pinned_bandwidth_bytes_per_s"] == doc["rates"]["pageable_bandwidth_bytes_per_s"] > 0
    runs = doc["runs"]
    kinds = [r["kind"] for r in runs]
    assert kinds.count("baseline") == 2 and kinds.count("offloadkit") == 6
    for run in runs:
        assert set(RUN_KEYS) <= set(run)
        assert run["seconds_per_step"] > 0 and run["ratio_to_resident"] > 0
    for run in (r for r in runs if r["kind"] == "offloadkit"):
        assert run["budget"] == "95%" and run["budget_bytes"] == int(doc["model_bytes"] * 0.95)
        assert run["peak_device_bytes"] <= run["budget_bytes"] and run["within_budget"]
        assert run["oom_recoveries"] == 0
        # on CPU every step is paired with a step of an all-resident copy
        assert len(run["paired_resident_step_seconds"]) == 1
    cpu_only = [r for r in runs if r["strategy"] == "cpu_only"]
    assert all(r["peak_device_bytes"] == 0 for r in cpu_only)
    layerwise = [r for r in runs if r["strategy"] == "layerwise"]
    assert all(r["streamed_blocks"] == 3 and r["bytes_transferred"] > 0 for r in layerwise)
    assert all(r["predicted_slowdown"] >= 1.0 for r in layerwise)
    assert {r["home"] for r in layerwise} == {"host", "disk", "shared"}
    homes = {r["home"]: r for r in layerwise}  # the tier each run really used
    assert homes["shared"]["host_shared_bytes"] == homes["host"]["host_pageable_bytes"] > 0
    assert homes["shared"]["host_pageable_bytes"] == homes["host"]["host_shared_bytes"] == 0
    # layerwise and cpu_only ignore the extra 5 %: the same plan is measured once
    same = [s for s in doc["skipped"] if s["budget"] == "100%"]
    assert {s["strategy"] for s in same} == {"layerwise", "cpu_only"}
    assert all("same plan as" in s["reason"] for s in same)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text().count("\n| layerwise |") == 3
    peer = [r for r in runs if r["kind"] == "peer"]
    if peer:  # accelerate installed (the `peers` extra)
        assert peer[0]["strategy"] == "accelerate_disk_offload" and peer[0]["peak_rss_bytes"] > 0


def test_lora_rank_repeats_each_run_with_the_lora_and_counts_its_bytes():
    """Each run is followed by the same run with a random LoRA; a streamed step moves the
    LoRA's bytes on top of the blocks' (each tensor aligned in the block's copy)."""
    from turbowan.bench.sweep import Sweep, SweepSpec
    from turbowan.bench.workload import from_tokens

    spec = SweepSpec(preset="tiny", workload=from_tokens(16), device="cpu", attention="original",
                     steps=1, warmup=0, runs=[("layerwise", "100%")], lora_rank=4)
    doc = Sweep(spec, log=lambda line: None).run()
    kinds = [(r["strategy"], r["kind"], r["lora_rank"]) for r in doc["runs"]]
    assert kinds[:4] == [("resident", "baseline", None), ("resident", "lora", 4),
                         ("layerwise", "offloadkit", None), ("layerwise", "lora", 4)]
    plain, lora = doc["runs"][2], doc["runs"][3]
    # rank 4 on the ten linears of 3 blocks: (in + out) * 4 fp32 values per linear
    per_block = 4 * 4 * sum(in_f + out_f for in_f, out_f in
                            [(256, 256)] * 8 + [(256, 512), (512, 256)])
    assert lora["lora_bytes"] == 3 * per_block
    aligned = sum(-(-n // 256) * 256 for n in  # the 20 LoRA tensors of a block
                                         [4 * 4 * d for d in [256] * 18 + [512, 512]])
    # every copy moves whole blocks (how many copies a step counts depends on when the next
    # step's prefetch starts): the plain run moves whole plain blocks, the LoRA run whole
    # blocks that are exactly the LoRA's aligned bytes larger
    block = doc["block_bytes"][0]
    assert plain["bytes_per_step"] % block == 0 and plain["bytes_per_step"] >= 3 * block
    assert lora["bytes_per_step"] % (block + aligned) == 0
    assert lora["bytes_per_step"] >= 3 * (block + aligned)
    assert lora["lora_bytes_per_step_ratio"] == pytest.approx((block + aligned) / block)
    assert lora["lora_time_ratio"] > 0 and doc["runs"][1]["lora_time_ratio"] > 0


def test_a_peer_that_cannot_run_here_is_recorded_as_skipped():
    """No model is built for it; the skip has no budget and names the peer's home tier."""
    from turbowan.bench.peers import run_peers
    from turbowan.bench.sweep import Sweep, SweepSpec
    from turbowan.bench.workload import from_tokens

    lines: list[str] = []
    sweep = Sweep(SweepSpec(preset="tiny", workload=from_tokens(16), device="cpu"),
                  log=lines.append)
    sweep._build = lambda: pytest.fail("a peer that cannot run built a model")
    assert run_peers(sweep, ["diffusers_group_stream"], inputs=None) == []
    # CI's environment has no diffusers; a developer's may (then only CUDA is missing here)
    reason = (
        "needs a CUDA device (side-stream prefetch)"
        if importlib.util.find_spec("diffusers") is not None
        else "diffusers is not installed; `pip install diffusers` to compare against it"
    )
    assert sweep.skipped == [{"strategy": "diffusers_group_stream", "budget": None,
                              "home": "pinned", "reason": reason}]
    assert lines == [f"skipped diffusers_group_stream (pinned): {reason}"]
    from turbowan.bench.report import skipped_lines

    assert skipped_lines(sweep.skipped) == lines[0]  # the end-of-run summary says the same


# ------------------------------------------------------------------ CLI errors (before any work)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "layerwize"], "unknown strategy 'layerwize'; installed strategies: "),
        (["--budgets", "12G"], "--budgets"),
        (["--budgets", "150%"], "at most 100%"),
        (["--frames", "80"], "4n+1"),
        (["--tokens", "64", "--frames", "81"], "either --tokens or --resolution"),
        (["--peers", "deepspeed"], "unknown peer 'deepspeed'"),
        (["--home", "ssd"], "--home"),
        (["--device", "mps"], "--device mps: offloadkit streams to 'cuda' or 'cpu'"),
        (["--option", "chunkwise"], "STRATEGY.KEY=VALUE"),
        (["--plan", "--gpu", "50%"], "card sizes"),
        (["--plan", "--bandwidth", "0"], "--bandwidth must be a positive"),
        (["--lora-rank", "0"], "--lora-rank must be a rank of at least 1"),
        (["--plan", "--lora-rank", "4"], "does not apply to --plan"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("turbowan-bench: error:") and message in err


# ------------------------------------------------------------------ argument helpers


def test_percent_budgets_are_a_share_of_the_model_and_pairs_expand():
    from turbowan.bench.sweep import resolve_budget, strategy_budget_pairs

    assert resolve_budget("25%", 1000, "cpu") == 250
    assert resolve_budget("512MiB", 1000, "cpu") == 512 * 2**20
    assert strategy_budget_pairs(["layerwise", "adaptive@8GB"], ["50%", "100%"]) == [
        ("layerwise", "50%"), ("layerwise", "100%"), ("adaptive", "8GB")]


def test_peer_names_expand_and_options_parse():
    from turbowan.bench.peers import parse_peers

    assert parse_peers("diffusers") == ["diffusers_group", "diffusers_group_stream",
                                        "diffusers_group_disk"]
    assert parse_peers("accelerate_disk_offload,accelerate") == [
        "accelerate_disk_offload", "accelerate_cpu_offload"]
    assert cli.parse_options(["manual.resident=0,4", "chunkwise.chunk_size=2",
                              "manual.resident_file=x.json"]) == {
        "manual": {"resident": [0, 4], "resident_file": "x.json"},
        "chunkwise": {"chunk_size": 2}}
    assert cli.parse_options(["manual.resident=3,"]) == {"manual": {"resident": [3]}}


def test_threads_apply_to_the_run_and_are_given_back(tmp_path, monkeypatch):
    """`--threads` sets torch's CPU threads for the sweep; a caller running the bench
    in-process (a notebook, this suite) gets its own count back."""
    from turbowan.bench import machine

    seen = []
    real = machine.measure_copy_bandwidth

    def spy(*args, **kwargs):  # called during the sweep, after --threads took effect
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(machine, "measure_copy_bandwidth", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["--preset", "tiny", "--attention", "original", "--tokens", "16",
                         "--strategies", "layerwise@100%", "--steps", "1", "--warmup", "0",
                         "--no-resident-between", "--peers", "", "--threads", "1",
                         "--json", str(tmp_path / "s.json")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
