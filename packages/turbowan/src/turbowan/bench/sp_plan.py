"""Plan mode with ``--sp``: what N-way Ulysses sequence parallel asks of each GPU and of the
host, predicted from shapes (no GPU, no weights).

Per rank: a 1/N share of the tokens (cut on 128-token tiles), so the activation reserve
shrinks and the weight budget grows; the block compute is taken as 1/N of one GPU's (the
linears are token by token, and attention covers the whole sequence for 1/N of the heads);
each self-attention trades q, k, v and its output, 4 x tokens x dim x 2 bytes / N per rank of
which (N-1)/N crosses the link. Host RAM per node is given twice: with a private home every
process keeps its own copy of both experts; with ``--home shared`` (the default under torchrun)
the node keeps one copy of their blocks, and each process only its non-block tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from turbowan.bench.plan import CUDA_OVERHEAD_BYTES, Card, activation_bytes, plan_strategy_rows
from turbowan.distributed.ulysses import INT8_TOKEN_TILE, split_sizes

if TYPE_CHECKING:
    from offloadkit import ModelProfile
    from turbowan.dit.config import DiTConfig

EXPERTS = 2  # high- and low-noise, both kept on every node


def host_bytes_per_node(profile: ModelProfile, processes: int, *, shared: bool) -> int:
    """Host RAM for both experts' weights on a node running ``processes`` ranks."""
    blocks = profile.block_bytes
    if not shared:
        return processes * EXPERTS * profile.total_bytes
    return EXPERTS * blocks + processes * EXPERTS * (profile.total_bytes - blocks)


def all_to_all_bytes(config: DiTConfig, tokens: int, sp: int, *, dtype_bytes: int = 2) -> int:
    """Bytes one rank sends per block: q, k, v and the output, (N-1)/N of its chunk each."""
    if sp == 1:
        return 0
    chunk = max(split_sizes(tokens, sp, INT8_TOKEN_TILE))
    return int(4 * chunk * config.dim * dtype_bytes * (sp - 1) / sp)


def sp_rows(profile: ModelProfile, config: DiTConfig, *, tokens: int, cards: Sequence[Card],
            sizes: Sequence[int], strategy: str, bandwidth: float, link_bandwidth: float,
            block_seconds: float, dtype_bytes: int = 2) -> list[dict]:
    """One row per card and sp size: the per-rank plan (planned and simulated as for one GPU,
    with the rank's reserve and block time), its peak, host RAM and step time."""
    rows: list[dict] = []
    for card in cards:
        one_gpu = None
        for n in sizes:
            if config.num_heads % n:
                rows.append({"card": card.label, "sp": n, "strategy": strategy,
                             "note": f"{n} does not divide the {config.num_heads} heads"})
                continue
            chunk = max(split_sizes(tokens, n, INT8_TOKEN_TILE))
            # the whole sequence for heads/N: q, k, v and the output after the trade
            traded = 4 * tokens * (config.dim // n) * dtype_bytes
            reserve = activation_bytes(config, chunk, dtype_bytes=dtype_bytes) + traded \
                + CUDA_OVERHEAD_BYTES
            a2a = all_to_all_bytes(config, tokens, n, dtype_bytes=dtype_bytes)
            [row] = plan_strategy_rows(profile, [strategy], [card], reserve_bytes=reserve,
                                       bandwidth=bandwidth,
                                       block_seconds=block_seconds / n + a2a / link_bandwidth)
            rows.append(row)
            row.update(sp=n, tokens_per_rank=chunk, reserve_bytes=reserve,
                       host_bytes_per_node=host_bytes_per_node(profile, n, shared=False),
                       host_bytes_per_node_shared=host_bytes_per_node(profile, n, shared=True),
                       all_to_all_bytes_per_block=a2a,
                       all_to_all_seconds_per_block=a2a / link_bandwidth)
            if "predicted_seconds_per_step" not in row:
                continue
            row["predicted_peak_bytes"] = row["predicted_peak_device_bytes"] + reserve
            if n == 1:
                one_gpu = row["predicted_seconds_per_step"]
            if one_gpu:
                row["predicted_speedup"] = one_gpu / row["predicted_seconds_per_step"]
    return rows


def sp_table(rows: Sequence[dict]) -> str:
    from turbowan.bench.report import _fmt, _table, gib

    headers = ["card", "sp", "tokens/rank", "budget GiB", "resident", "streamed",
               "peak/rank GiB", "host GiB/node private", "shared", "a2a MiB/block", "s/step", "speed-up", "note"]
    lines = [[
        r["card"], str(r["sp"]), _fmt(r.get("tokens_per_rank"), "d"), gib(r.get("budget_bytes")),
        _fmt(r.get("resident_count"), "d"), _fmt(r.get("streamed_count"), "d"),
        gib(r.get("predicted_peak_bytes")), gib(r.get("host_bytes_per_node")),
        gib(r.get("host_bytes_per_node_shared")),
        _fmt(None if "all_to_all_bytes_per_block" not in r
             else r["all_to_all_bytes_per_block"] / 2**20, ".0f"),
        _fmt(r.get("predicted_seconds_per_step"), ".2f"), _fmt(r.get("predicted_speedup"), ".2f"),
        r.get("note") or ""] for r in rows]
    return _table(headers, lines)
