"""comfy_native inside ComfyUI, against a STAND-IN for comfy.model_management and
comfy.model_patcher (fake modules in sys.modules mimicking ComfyUI's names and the parts of
its behaviour that matter here: ModelPatcher writes attributes onto the module it is given,
load_models_gpu records what it was asked, a full load moves the whole module)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from models import make_inputs, make_model

import offloadkit
from offloadkit.errors import BudgetError, OffloadError
from offloadkit.strategies.comfy_native import module_bytes


class ComfyStandIn:
    def __init__(self, *, leave_on_cpu: str | None = None, old_signature: bool = False) -> None:
        self.load_calls: list[dict] = []
        self.unpatched: list[torch.device] = []
        self.current_loaded_models: list = []
        self.strays: list = []
        standin = self

        class ModelPatcher:  # the attributes ComfyUI's ModelPatcher sets on its model
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                self.size = size or sum(t.numel() * t.element_size() for t in model.state_dict().values())
                if not hasattr(model, "device"):
                    model.device = offload_device
                model.model_loaded_weight_memory = 0
                model.lowvram_patch_counter = 0
                model.model_lowvram = False

            def model_size(self):
                return self.size

            def loaded_size(self):
                return self.model.model_loaded_weight_memory

            def unpatch_model(self, device_to=None, unpatch_weights=True):
                standin.unpatched.append(device_to)
                for owner, name, tensor in standin.strays:  # the stand-in's stray goes home too
                    owner._buffers[name] = tensor
                if device_to is not None:
                    self.model.to(device_to)
                    self.model.device = device_to
                self.model.model_loaded_weight_memory = 0

        def full_load(models, memory_required=0, force_patch_weights=False,
                      minimum_memory_required=None, force_full_load=False):
            self.load_calls.append(dict(memory_required=memory_required,
                                        minimum_memory_required=minimum_memory_required,
                                        force_full_load=force_full_load))
            for patcher in models:
                patcher.model.to(patcher.load_device)
                patcher.model.device = patcher.load_device
                patcher.model.model_loaded_weight_memory = patcher.model_size()
                if leave_on_cpu:  # what a partial load does to a layer that is not comfy.ops
                    path, name = ("inner." + leave_on_cpu).rsplit(".", 1)
                    owner = patcher.model.get_submodule(path)
                    self.strays.append((owner, name, owner._buffers[name]))
                    owner._buffers[name] = owner._buffers[name].to("meta")  # "not on the device"
                self.current_loaded_models.append(types.SimpleNamespace(model=patcher))

        def old_load(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None):
            full_load(models, memory_required, force_patch_weights, minimum_memory_required)

        mm = types.ModuleType("comfy.model_management")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.load_models_gpu = old_load if old_signature else full_load
        mm.current_loaded_models = self.current_loaded_models
        mp = types.ModuleType("comfy.model_patcher")
        mp.ModelPatcher = ModelPatcher
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.model_patcher = mm, mp
        self.modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": mp}


@pytest.fixture
def install(monkeypatch):
    def _install(**kwargs) -> ComfyStandIn:
        standin = ComfyStandIn(**kwargs)
        for name, module in standin.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return standin
    return _install


def test_full_load_counts_buffers_and_leaves_the_model_untouched(install):
    comfy = install()
    model = make_model()
    tokens, mask = make_inputs()
    expected = model(tokens, mask=mask)
    size = module_bytes(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > params  # the int8 weights are buffers: a parameter-only count misses them
    handle = offloadkit.apply(model, "comfy_native", device="cpu", budget=2 * size)
    assert comfy.load_calls == [dict(memory_required=size, minimum_memory_required=None,
                                     force_full_load=True)]
    assert torch.equal(model(tokens, mask=mask), expected)
    stats = handle.stats()
    assert stats.peak_device_bytes == size and stats.streamed_blocks == 0
    assert stats.resident_blocks == len(model.blocks)
    # ComfyUI wrote its bookkeeping onto a container, not onto the user's model
    assert not hasattr(model, "model_loaded_weight_memory") and not hasattr(model, "device")
    handle.remove()
    assert comfy.unpatched == [torch.device("cpu")] and comfy.current_loaded_models == []
    assert torch.equal(model(tokens, mask=mask), expected)


def test_older_comfyui_without_force_full_load_gets_the_whole_size_as_minimum(install):
    comfy = install(old_signature=True)
    model = make_model()
    size = module_bytes(model)
    offloadkit.apply(model, "comfy_native", device="cpu", budget="auto").remove()
    assert comfy.load_calls == [dict(memory_required=size, minimum_memory_required=size,
                                     force_full_load=False)]


def test_budget_below_the_whole_model_points_to_adaptive(install):
    comfy = install()
    model = make_model()
    size = module_bytes(model)
    with pytest.raises(BudgetError, match=r"(?s)the whole model.*comfy.ops.*'adaptive'"):
        offloadkit.apply(model, "comfy_native", device="cpu", budget=size // 2)
    assert comfy.load_calls == []
    offloadkit.apply(model, "layerwise", device="cpu", budget=size).remove()  # left unmarked


def test_a_partial_load_by_comfyui_is_caught_and_undone(install):
    comfy = install(leave_on_cpu="blocks.0.proj.weight")
    model = make_model()
    with pytest.raises(OffloadError, match=r"only part of the model.*blocks.0.proj.weight.*'adaptive'"):
        offloadkit.apply(model, "comfy_native", device="cpu", budget="auto")
    assert comfy.unpatched == [torch.device("cpu")] and comfy.current_loaded_models == []


def test_engine_options_are_refused(install):
    install()
    with pytest.raises(TypeError, match="unknown option.*comfy_native"):
        offloadkit.apply(make_model(), "comfy_native", device="cpu", budget="auto", pin_limit_bytes=1)
