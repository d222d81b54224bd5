"""An offloaded model stays a normal PyTorch model: ``state_dict()`` gives the real weights,
buffers its forward updates are kept, training and ``.to()`` are refused with a clear error
(model unharmed), pickling names the fix, another offloader is refused, several threads get
correct outputs, and the disk tier's temporary file never outlives the process.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from models import make_inputs, make_model, snapshot
from torch import nn

import offloadkit
from offloadkit.engine import profile_model
from offloadkit.errors import OffloadError


def _tiny(seed: int = 4):
    return make_model(seed=seed, dim=32, hidden=64, num_blocks=4).requires_grad_(False)


def _min_budget(model, name: str = "layerwise") -> int:
    return offloadkit.get_strategy(name)().min_device_bytes(profile_model(model))


def _apply(model, tmp_path, name: str = "layerwise", home: str = "host", budget=None):
    return offloadkit.apply(model, name, device="cpu", home=home,
                            budget=_min_budget(model, name) if budget is None else budget,
                            disk_path=str(tmp_path) if home == "disk" else None)


def _same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and a[key][1:] == b[key][1:], key


# ---------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("home", ["host", "disk"])
def test_state_dict_while_offloaded_is_the_real_weights(tmp_path, home):
    model = _tiny()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, mask = make_inputs(length=8)
    handle = _apply(model, tmp_path, home=home)
    try:
        with torch.no_grad():
            model(tokens, mask=mask)  # some blocks bound to slots, others stand-ins
        for got in (model.state_dict(), handle.state_dict()):
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert torch.equal(got[key], value), key
        # a part of the model too, and torch.save writes what load gives back
        block = model.blocks[2].state_dict()
        assert torch.equal(block["qkv.weight"], want["blocks.2.qkv.weight"])
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert all(torch.equal(loaded[k], want[k]) for k in want)
    finally:
        handle.remove()


def test_load_state_dict_while_offloaded_is_refused_before_anything_loads(tmp_path):
    model = _tiny()
    before = snapshot(model)
    other = _tiny(seed=9).state_dict()
    with _apply(model, tmp_path):
        for target, state in ((model, other),
                              (model.blocks[1], model.blocks[1].state_dict())):
            with pytest.raises(OffloadError, match=r"load_state_dict.*Nothing was loaded"):
                target.load_state_dict(state)
    _same_model(snapshot(model), before)
    model.load_state_dict(other)  # after remove(): a plain module again
    assert torch.equal(model.blocks[0].qkv.weight, other["blocks.0.qkv.weight"])


def test_save_pretrained_while_offloaded_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**8,
                              blocks="model.layers"):
        model.save_pretrained(tmp_path / "saved")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    got = back.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------- buffers
class Counting(nn.Module):
    """A block whose forward writes its buffers: BatchNorm running stats (train mode), an
    in-place step counter, and a cache buffer assigned anew."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        y = self.norm(self.lin(x)) + self.last * 0.5
        self.last = y.mean(0).detach()
        return y * self.steps


class Stack(nn.Module):
    def __init__(self, dim: int = 16, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Counting(dim) for _ in range(n))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(("name", "home", "share"), [
    ("layerwise", "host", 0.0), ("layerwise", "disk", 0.0), ("adaptive", "host", 1.0),
    ("adaptive", "host", 0.5),
])
def test_buffers_forward_writes_are_kept_and_restored(tmp_path, name, home, share):
    torch.manual_seed(0)
    reference = Stack().train().requires_grad_(False)
    model = copy.deepcopy(reference)
    xs = [torch.randn(5, 16) for _ in range(3)]
    profile = profile_model(model)
    low = _min_budget(model, name)
    handle = _apply(model, tmp_path, name, home,
                    budget=int(low + share * (profile.total_bytes - low)) + 1)
    try:
        with torch.no_grad():
            for x in xs:
                assert torch.equal(model(x), reference(x))
        assert model.state_dict()["blocks.1.steps"].item() == 3
        state = model.state_dict()
        for key, value in reference.state_dict().items():
            assert torch.equal(state[key], value), key
    finally:
        handle.remove()
    _same_model(snapshot(model), snapshot(reference))


def test_a_buffer_replaced_by_a_different_shape_is_refused(tmp_path):
    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cache", torch.zeros(3))

        def forward(self, x):
            self.cache = torch.cat([self.cache, x.sum().view(1)])
            return x

    model = nn.Sequential(Growing(), Growing())
    with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**6,
                              blocks=[model[0], model[1]]), \
            pytest.raises(OffloadError, match=r"replaced '0\.cache'.*fixed-size"):
        model(torch.ones(2))


# ---------------------------------------------------------------------------- training
def test_training_through_offloaded_blocks_is_refused_and_model_unharmed(tmp_path):
    model = make_model(seed=4, dim=32, hidden=64, num_blocks=4)  # parameters require grad
    before = snapshot(model)
    tokens, mask = make_inputs(length=8)
    with _apply(model, tmp_path, "adaptive", budget=10**8):  # even all resident
        with pytest.raises(OffloadError, match=r"inference-only.*torch\.no_grad\(\).*freeze"):
            model(tokens, mask=mask)
        with torch.no_grad():
            model(tokens, mask=mask)
    _same_model(snapshot(model), before)


def test_frozen_blocks_with_trainable_head_give_exact_gradients(tmp_path):
    def grads(offload: bool):
        model = make_model(seed=4, dim=32, hidden=64, num_blocks=4).requires_grad_(False)
        model.head.requires_grad_(True)
        tokens, mask = make_inputs(length=8)
        handle = _apply(model, tmp_path) if offload else None
        try:
            model(tokens, mask=mask).square().mean().backward()
        finally:
            if handle:
                handle.remove()
        return model.head.weight.grad, model.head.bias.grad

    for got, want in zip(grads(True), grads(False), strict=True):
        assert torch.equal(got, want)


def test_trainable_layer_before_streamed_blocks_is_refused(tmp_path):
    model = _tiny()
    model.embed.requires_grad_(True)  # LoRA-style: a trainable layer feeding the blocks
    tokens, mask = make_inputs(length=8)
    with _apply(model, tmp_path), pytest.raises(OffloadError, match="input that requires grad"):
        model(tokens, mask=mask)


# ---------------------------------------------------------------------------- .to / pickle
@pytest.mark.parametrize("call", [
    lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.double(),
    lambda m: m.cuda(), lambda m: m.blocks[1].to(torch.bfloat16),
])
def test_dtype_or_device_change_is_refused_and_model_unharmed(tmp_path, call):
    model = _tiny()
    tokens, mask = make_inputs(length=8)
    with torch.no_grad():
        expected = model(tokens, mask=mask)
    with _apply(model, tmp_path):
        with pytest.raises(OffloadError, match=r"handle\.remove\(\).*apply\(\) it again"):
            call(model)
        assert model.to("cpu") is model  # changes nothing: allowed
        with torch.no_grad():
            assert torch.equal(model(tokens, mask=mask), expected)
    assert model.half().embed.weight.dtype == torch.float16  # guards gone after remove()


@pytest.mark.parametrize("what", ["deepcopy", "pickle", "torch.save"])
def test_copying_an_offloaded_model_names_offloadkit_and_the_fix(tmp_path, what):
    model = _tiny()
    copy_it = {"deepcopy": copy.deepcopy, "pickle": pickle.dumps,
               "torch.save": lambda m: torch.save(m, io.BytesIO())}[what]
    with _apply(model, tmp_path):
        with pytest.raises(OffloadError, match=r"offloadkit.*handle\.state_dict\(\)"):
            copy_it(model)
        with pytest.raises(OffloadError, match="offloadkit"):
            copy_it({"nested": model.blocks[0]})
    assert torch.equal(copy.deepcopy(model).head.weight, model.head.weight)


# ---------------------------------------------------------------------------- other offloaders
def test_accelerate_cpu_offload_before_or_after_apply_is_refused(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = _tiny()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(OffloadError, match="accelerate hook"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**8)
    accelerate.hooks.remove_hook_from_module(model, recurse=True)

    model = _tiny()
    tokens, mask = make_inputs(length=8)
    with _apply(model, tmp_path):
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        with torch.no_grad(), pytest.raises(OffloadError, match="accelerate hook"):
            model(tokens, mask=mask)
        accelerate.hooks.remove_hook_from_module(model, recurse=True)  # as the error says


def test_diffusers_group_offloading_before_or_after_apply_is_refused(tmp_path):
    hooks = pytest.importorskip("diffusers.hooks")
    cpu = torch.device("cpu")
    model = _tiny()
    hooks.apply_group_offloading(model, onload_device=cpu, offload_type="block_level",
                                 num_blocks_per_group=1)
    with pytest.raises(OffloadError, match="diffusers group offloading"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**8)

    model = _tiny()
    tokens, mask = make_inputs(length=8)
    with _apply(model, tmp_path):
        hooks.apply_group_offloading(model, onload_device=cpu, offload_type="block_level",
                                     num_blocks_per_group=1)
        with torch.no_grad(), pytest.raises(OffloadError, match="diffusers group offloading"):
            model(tokens, mask=mask)


# ---------------------------------------------------------------------------- threads
@pytest.mark.parametrize("name", ["layerwise", "adaptive"])
def test_threads_calling_forward_together_get_correct_outputs(tmp_path, name):
    model = _tiny()
    inputs = [make_inputs(seed=s, length=8) for s in range(4)]
    with torch.no_grad():
        expected = [model(t, mask=m) for t, m in inputs]
    wrong: list[tuple[int, int]] = []
    start = threading.Barrier(len(inputs))

    def worker(k: int) -> None:
        tokens, mask = inputs[k]
        start.wait()
        with torch.inference_mode():
            for step in range(6):
                if not torch.equal(model(tokens, mask=mask), expected[k]):
                    wrong.append((k, step))

    budget = _min_budget(model, name) + profile_model(model).blocks[0].nbytes
    with _apply(model, tmp_path, name, budget=budget) as handle:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert handle.stats().forwards == 6 * len(inputs) and handle.stats().streamed_blocks
    assert wrong == []


# ---------------------------------------------------------------------------- disk file
def test_disk_tier_file_is_gone_when_the_process_ends_without_remove(tmp_path):
    """Each ending is its own process, forked from one that imported torch once: it applies
    the disk tier and exits normally or dies (os._exit) without remove(); the parent then
    lists the folder the tier was written to."""
    script = (
        "import json, os, sys, torch, offloadkit\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from models import make_model\n"
        "for how in ('exit', 'crash'):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        m = make_model(dim=32, hidden=64, num_blocks=4)\n"
        "        h = offloadkit.apply(m, 'layerwise', device='cpu', budget=10**8, home='disk',"
        " disk_path=sys.argv[2])\n"
        "        assert h.stats().disk_bytes > 0\n"
        "        print('applied', how, flush=True)\n"
        "        os._exit(0) if how == 'crash' else sys.exit(0)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    print(json.dumps([how, os.waitstatus_to_exitcode(status), os.listdir(sys.argv[2])]),"
        " flush=True)\n"
    )
    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", script, here, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0::2] == ["applied exit", "applied crash"], out.stderr
    assert [json.loads(line) for line in lines[1::2]] == [["exit", 0, []], ["crash", 0, []]]
    assert list(tmp_path.iterdir()) == []
