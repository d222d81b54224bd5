"""A DiT with deterministic random weights and matching inputs, so every strategy and peer in
a sweep times the same model on the same tensors, and a rebuilt copy is bit-identical.

Random int8 weights come from one seeded pool tiled over every tensor: filling 14 GB of
int8 with a fresh generator call per element would take minutes, and benchmarks do not
care whether weights repeat, only that their values are sane (no inf/NaN downstream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbowan.bench.workload import Workload

_POOL_BYTES = 16 * 2**20


@dataclass
class BenchInputs:
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor

    def to(self, device: str) -> BenchInputs:
        return BenchInputs(*(v.to(device) for v in (self.x, self.t, self.context, self.y)))


def _fill_from_pool(tensor: torch.Tensor, pool: torch.Tensor) -> None:
    """Tile ``pool`` (same dtype) over ``tensor`` in place: memcpy speed, deterministic."""
    flat = tensor.view(-1)
    n = flat.numel()
    step = pool.numel()
    for start in range(0, n, step):
        stop = min(n, start + step)
        flat[start:stop].copy_(pool[: stop - start])


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every persistent tensor a deterministic, numerically sane random value.

    int8 weights: uniform in [-127, 127]; their block scales: about 0.02/73, so dequantised
    weights have std ~0.02 like a trained model; norm weights: 1; other floats: N(0, 0.02).
    """
    tensors = model.state_dict(keep_vars=True)
    # no pool longer than the largest tensor: drawing 16 MiB for the 9 MB tiny preset was
    # most of its build time
    largest = max((t.numel() for t in tensors.values()), default=1)
    generator = torch.Generator().manual_seed(seed)
    int8_pool = torch.randint(-127, 128, (min(_POOL_BYTES, largest),), dtype=torch.int8,
                              generator=generator)
    float_pools = {torch.float32: torch.randn(min(_POOL_BYTES // 4, largest),
                                              generator=generator) * 0.02}
    with torch.no_grad():
        for name, tensor in tensors.items():
            data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
            leaf = name.rsplit(".", 1)[-1]
            if data.dtype == torch.int8:
                _fill_from_pool(data, int8_pool)
            elif not data.is_floating_point():
                continue
            elif leaf == "scale" or leaf.endswith("_scale"):
                data.fill_(0.02 / 73.0)
            elif "norm" in name and leaf == "weight":
                data.fill_(1.0)
            else:
                if data.dtype not in float_pools:  # cast the pool once per dtype, not per tensor
                    float_pools[data.dtype] = float_pools[torch.float32].to(data.dtype)
                _fill_from_pool(data, float_pools[data.dtype])
    return model


def estimate_model_bytes(preset: str, *, quant: str = "int8", attention: str = "sla",
                         dtype: torch.dtype = torch.float32) -> int:  # fmt: skip
    """Bytes of the preset's weights at this compute dtype, from a ``meta`` build."""
    from turbowan.dit.config import get_preset
    from turbowan.dit.meta import build_meta

    model = build_meta(get_preset(preset), quant=quant, attention=attention, dtype=dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def build_bench_model(
    preset: str, *, quant: str = "int8", attention: str = "sla", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.nn.Module:
    """The preset's DiT on the CPU with deterministic random weights, in eval mode.

    Built on ``meta`` first and materialised with ``to_empty`` so the constructor's own
    initialisation (slow for 14B parameters) never runs (the DiT holds no buffers derived
    from its config: RoPE tables are built per call).
    """
    from turbowan.dit.config import get_preset
    from turbowan.dit.meta import build_meta

    model = build_meta(get_preset(preset), quant=quant, attention=attention, dtype=dtype)
    model = model.to_empty(device="cpu")
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def bench_inputs(config, workload: Workload, *, dtype: torch.dtype, seed: int = 0) -> BenchInputs:
    """Inputs of one DiT call at ``workload`` (on the CPU; move them with ``.to``)."""
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(workload.latent_shape, generator=generator).to(dtype)
    y = torch.randn(workload.condition_shape, generator=generator).to(dtype)
    context = torch.randn((workload.batch, config.text_len, config.text_dim), generator=generator)
    t = torch.full((workload.batch,), 933.0)
    return BenchInputs(x=x, t=t, context=context.to(dtype), y=y)
