"""A STAND-IN for ComfyUI, which cannot be installed in CI: the modules the node pack and
offloadkit's ``comfy_native`` strategy import, and the executor that runs nodes.

Every piece mirrors a named upstream function of ComfyUI v0.33.0 (source mirror
yzkee/ComfyUI, commit ``COMFYUI_COMMIT``); the docstrings say which. What is mirrored:

- ``execution.PromptExecutor.execute_async`` + ``main.prompt_worker``: nodes run on one
  long-lived worker thread (not the thread that imported the pack), inside
  ``torch.inference_mode()``; the interrupt flag is cleared when a prompt starts and checked
  before each node (``nodes.before_node_execution``); ``InterruptProcessingException`` (a
  BaseException) ends the prompt.
- ``comfy.model_management``: ``current_loaded_models``, ``LoadedModel``, ``load_models_gpu``
  (including its lowvram arithmetic and the VRAM states of ``--cpu/--lowvram/--novram/
  --highvram``), ``free_memory``, ``get_free_memory``, the interrupt functions.
  The device: with ``--cpu`` it is the CPU, as upstream. In the other modes the tensors still
  live on the CPU (CI has no GPU), but model management treats the device as a GPU of
  ``vram_bytes``: its free memory is that less what the registered models report as loaded.
- ``comfy.model_patcher.ModelPatcher``: a minimal patcher for "another model" (say the text
  encoder) that holds simulated device memory and gives it back when asked.
- ``comfy.utils.ProgressBar`` with ``PROGRESS_BAR_HOOK``; ``folder_paths``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COMFYUI_COMMIT = "783545f689a0af730065994b46b382ae24844c99"
MODES = ("normal", "cpu", "lowvram", "novram", "highvram")
MB = 1024 * 1024


class VRAMState(enum.Enum):  # comfy.model_management.VRAMState
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class InterruptProcessingException(BaseException):  # comfy.model_management, a BaseException
    pass


class ComfyUI:
    """One stand-in ComfyUI process. ``install(monkeypatch)`` puts its modules in sys.modules.

    ``reserve_bytes`` stands for ComfyUI's inference reserve (``minimum_inference_memory``:
    0.8 GiB + ``EXTRA_RESERVED_VRAM`` 400 MiB upstream), scaled to the tiny test models.
    """

    def __init__(self, *, mode: str = "normal", vram_bytes: int = 64 * MB,
                 reserve_bytes: int = 1 * MB, models_dir: Path | None = None,
                 output_dir: Path | None = None) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.vram_bytes = vram_bytes
        self.reserve_bytes = reserve_bytes
        self.models_dir = models_dir
        self.output_dir = output_dir
        self.progress: list[tuple[int, int, Any]] = []
        self.free_memory_calls: list[tuple[float, torch.device]] = []
        self.load_calls: list[dict[str, Any]] = []
        self.interrupt_checks = 0
        self.on_interrupt_check: Callable[[int], None] | None = None
        self.import_thread = threading.get_ident()
        self.node_threads: set[int] = set()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prompt_worker")
        self.modules = self._build_modules()

    # ------------------------------------------------------------------ modules
    def _build_modules(self) -> dict[str, types.ModuleType]:
        mm = types.ModuleType("comfy.model_management")
        standin = self
        # model_management module start-up: args.cpu / --lowvram / --novram / --highvram
        mm.VRAMState = VRAMState
        mm.vram_state = {"cpu": VRAMState.DISABLED, "lowvram": VRAMState.LOW_VRAM,
                         "novram": VRAMState.NO_VRAM, "highvram": VRAMState.HIGH_VRAM,
                         "normal": VRAMState.NORMAL_VRAM}[self.mode]
        mm.lowvram_available = True
        mm.MIN_WEIGHT_MEMORY_RATIO = 0.0  # is_nvidia()
        mm.EXTRA_RESERVED_VRAM = 0
        mm.DISABLE_SMART_MEMORY = False
        mm.current_loaded_models = []
        mm.InterruptProcessingException = InterruptProcessingException
        mm.interrupt_processing = False
        mm.interrupt_processing_mutex = threading.RLock()

        def get_torch_device() -> torch.device:  # get_torch_device
            return torch.device("cpu")

        def is_device_cpu(device: torch.device) -> bool:  # is_device_cpu (see the docstring)
            return standin.mode == "cpu"

        def cpu_mode() -> bool:
            return standin.mode == "cpu"

        def get_free_memory(dev=None, torch_free_too=False):  # get_free_memory
            if standin.mode == "cpu":
                free = 1 << 40  # psutil.virtual_memory().available upstream
            else:
                used = sum(m.model_loaded_memory() for m in mm.current_loaded_models
                           if m.model is not None)
                free = standin.vram_bytes - used
            return (free, 0) if torch_free_too else free

        def extra_reserved_memory() -> int:
            return mm.EXTRA_RESERVED_VRAM

        def minimum_inference_memory() -> int:
            return standin.reserve_bytes + extra_reserved_memory()

        def unet_offload_device() -> torch.device:  # unet_offload_device
            return get_torch_device() if mm.vram_state == VRAMState.HIGH_VRAM else torch.device("cpu")

        def soft_empty_cache(force=False) -> None:
            pass

        def cleanup_models_gc() -> None:  # cleanup_models_gc, less the gc pass
            for cur in mm.current_loaded_models:
                if cur.is_dead():
                    raise AssertionError("stand-in: a registered model leaked (patcher gone, "
                                         "model alive)")

        def cleanup_models() -> None:  # cleanup_models
            mm.current_loaded_models[:] = [m for m in mm.current_loaded_models
                                           if m.real_model() is not None]

        class LoadedModel:  # LoadedModel (weakref to the patcher, finalizer on its model)
            def __init__(self, model) -> None:
                self._model = weakref.ref(model)
                self.device = model.load_device
                self.real_model = None
                self.currently_used = True
                self.model_finalizer = None

            @property
            def model(self):
                return self._model()

            def model_memory(self):
                return self.model.model_size()

            def model_loaded_memory(self):
                return self.model.loaded_size()

            def model_offloaded_memory(self):
                return self.model.model_size() - self.model.loaded_size()

            def model_memory_required(self, device):
                if device == self.model.current_loaded_device():
                    return self.model_offloaded_memory()
                return self.model_memory()

            def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
                self.model.model_patches_to(self.device)
                self.model.model_patches_to(self.model.model_dtype())
                use_more_vram = lowvram_model_memory
                if use_more_vram == 0:
                    use_more_vram = 1e32
                self.model_use_more_vram(use_more_vram, force_patch_weights=force_patch_weights)
                real_model = self.model.model
                self.real_model = weakref.ref(real_model)
                self.model_finalizer = weakref.finalize(real_model, cleanup_models)
                self.model_finalizer.atexit = False
                return real_model

            def model_unload(self, memory_to_free=None, unpatch_weights=True):
                if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                    freed = self.model.partially_unload(self.model.offload_device, memory_to_free)
                    if freed >= memory_to_free:
                        return False
                self.model.detach(unpatch_weights)
                self.model_finalizer.detach()
                self.model_finalizer = None
                self.real_model = None
                return True

            def model_use_more_vram(self, extra_memory, force_patch_weights=False):
                return self.model.partially_load(self.device, extra_memory,
                                                 force_patch_weights=force_patch_weights)

            def __eq__(self, other):
                return self.model is other.model

            def is_dead(self):
                return self.real_model is not None and self.real_model() is not None \
                    and self.model is None

        def free_memory(memory_required, device, keep_loaded=(), for_dynamic=False,
                        pins_required=0, ram_required=0):  # free_memory
            standin.free_memory_calls.append((memory_required, device))
            cleanup_models_gc()
            can_unload, unloaded = [], []
            for i in range(len(mm.current_loaded_models) - 1, -1, -1):
                shift = mm.current_loaded_models[i]
                if (device is None or shift.device == device) and shift not in keep_loaded \
                        and not shift.is_dead():
                    can_unload.append((-shift.model_offloaded_memory(),
                                       sys.getrefcount(shift.model), shift.model_memory(), i))
                    shift.currently_used = False
            for x in sorted(can_unload):
                i = x[-1]
                memory_to_free = 0 if device is None else memory_required - get_free_memory(device)
                if memory_to_free > 0 and mm.current_loaded_models[i].model_unload(memory_to_free):
                    unloaded.append(i)
            return [mm.current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]

        def load_models_gpu(models, memory_required=0, force_patch_weights=False,
                            minimum_memory_required=None, force_full_load=False):  # load_models_gpu
            standin.load_calls.append(dict(memory_required=memory_required,
                                           minimum_memory_required=minimum_memory_required,
                                           force_full_load=force_full_load))
            cleanup_models_gc()
            inference_memory = minimum_inference_memory()
            extra_mem = max(inference_memory, memory_required + extra_reserved_memory())
            if minimum_memory_required is None:
                minimum_memory_required = extra_mem
            else:
                minimum_memory_required = max(inference_memory,
                                              minimum_memory_required + extra_reserved_memory())
            to_load = []
            for x in dict.fromkeys(list(models)[::-1]):
                loaded = LoadedModel(x)
                if loaded in mm.current_loaded_models:
                    found = mm.current_loaded_models[mm.current_loaded_models.index(loaded)]
                    found.currently_used = True
                    to_load.append(found)
                else:
                    to_load.append(loaded)
            required: dict[torch.device, float] = {}
            for loaded in to_load:
                required[loaded.device] = required.get(loaded.device, 0) \
                    + loaded.model_memory_required(loaded.device)
            for device, need in required.items():
                if not is_device_cpu(device):
                    free_memory(need * 1.1 + extra_mem, device)
                    if get_free_memory(device) < minimum_memory_required:
                        free_memory(minimum_memory_required, device)
            for loaded in to_load:
                if is_device_cpu(loaded.model.load_device):
                    state = VRAMState.DISABLED
                else:
                    state = mm.vram_state
                lowvram_model_memory = 0
                if mm.lowvram_available and state in (VRAMState.LOW_VRAM, VRAMState.NORMAL_VRAM) \
                        and not force_full_load:
                    loaded_memory = loaded.model_loaded_memory()
                    current_free = get_free_memory(loaded.model.load_device) + loaded_memory
                    lowvram_model_memory = max(
                        0, current_free - minimum_memory_required,
                        min(current_free * mm.MIN_WEIGHT_MEMORY_RATIO,
                            current_free - minimum_inference_memory()))
                    lowvram_model_memory = lowvram_model_memory - loaded_memory
                    if lowvram_model_memory == 0:
                        lowvram_model_memory = 0.1
                if state == VRAMState.NO_VRAM:
                    lowvram_model_memory = 0.1
                loaded.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
                if loaded in mm.current_loaded_models:  # upstream inserts a new entry each
                    mm.current_loaded_models.remove(loaded)  # time; the old one is the same model
                mm.current_loaded_models.insert(0, loaded)

        def loaded_models(only_currently_used=False):  # loaded_models
            return [m.model for m in mm.current_loaded_models
                    if not only_currently_used or m.currently_used]

        def unload_all_models():  # unload_all_models
            free_memory(1e30, get_torch_device())

        def interrupt_current_processing(value=True):  # interrupt_current_processing
            with mm.interrupt_processing_mutex:
                mm.interrupt_processing = value

        def processing_interrupted():  # processing_interrupted
            with mm.interrupt_processing_mutex:
                return mm.interrupt_processing

        def throw_exception_if_processing_interrupted():  # throw_exception_if_processing_interrupted
            standin.interrupt_checks += 1
            with mm.interrupt_processing_mutex:
                if mm.interrupt_processing:
                    mm.interrupt_processing = False
                    raise InterruptProcessingException()
            if standin.on_interrupt_check is not None:  # the user may press Cancel after
                standin.on_interrupt_check(standin.interrupt_checks)  # this check passed

        for fn in (get_torch_device, is_device_cpu, cpu_mode, get_free_memory,
                   extra_reserved_memory, minimum_inference_memory, unet_offload_device,
                   soft_empty_cache, cleanup_models_gc, cleanup_models, free_memory,
                   load_models_gpu, loaded_models, unload_all_models,
                   interrupt_current_processing, processing_interrupted,
                   throw_exception_if_processing_interrupted):
            setattr(mm, fn.__name__, fn)
        mm.LoadedModel = LoadedModel
        self.mm = mm

        utils = types.ModuleType("comfy.utils")
        utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: \
            standin.progress.append((value, total, node_id))

        class ProgressBar:  # comfy.utils.ProgressBar (the hook is read when it is made)
            def __init__(self, total, node_id=None):
                self.total = total
                self.current = 0
                self.hook = utils.PROGRESS_BAR_HOOK
                self.node_id = node_id

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                value = min(value, self.total)
                self.current = value
                if self.hook is not None:
                    self.hook(self.current, self.total, preview, node_id=self.node_id)

            def update(self, value):
                self.update_absolute(self.current + value)

        utils.ProgressBar = ProgressBar

        patcher_mod = types.ModuleType("comfy.model_patcher")
        patcher_mod.ModelPatcher = OtherModelPatcher

        fp = types.ModuleType("folder_paths")
        models_dir, output_dir = self.models_dir, self.output_dir

        def get_filename_list(folder):  # folder_paths.get_filename_list
            if models_dir is None:
                return []
            return sorted(p.name for p in models_dir.iterdir()
                          if p.suffix in (".safetensors", ".pth", ".pt"))

        def get_full_path(folder, name):  # folder_paths.get_full_path: None if absent
            if models_dir is None:
                return None
            path = models_dir / name
            return str(path) if path.is_file() else None

        def get_save_image_path(prefix, output_dir, image_width=0, image_height=0):
            # folder_paths.get_save_image_path: counter = highest "<prefix>_NNNNN" + 1
            subfolder = os.path.dirname(os.path.normpath(prefix))
            name = os.path.basename(os.path.normpath(prefix))
            folder = os.path.join(output_dir, subfolder)
            os.makedirs(folder, exist_ok=True)
            counters = [int(f[len(name) + 1:].split(".")[0].split("_")[0])
                        for f in os.listdir(folder)
                        if f.startswith(name + "_") and f[len(name) + 1:].split("_")[0].isdigit()]
            return folder, name, max(counters, default=0) + 1, subfolder, prefix

        fp.get_filename_list = get_filename_list
        fp.get_full_path = get_full_path
        fp.get_output_directory = lambda: str(output_dir)
        fp.get_save_image_path = get_save_image_path

        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher_mod
        return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                "comfy.model_patcher": patcher_mod, "folder_paths": fp}

    def install(self, monkeypatch) -> ComfyUI:
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    # ------------------------------------------------------------------ device memory
    @property
    def current_loaded_models(self) -> list:
        return self.mm.current_loaded_models

    def loaded_names(self) -> list[str]:
        return [type(m.model.model).__name__ for m in self.current_loaded_models
                if m.model is not None]

    # ------------------------------------------------------------------ executor
    def interrupt(self) -> None:
        """The Cancel button: nodes.interrupt_processing -> interrupt_current_processing."""
        self.mm.interrupt_current_processing(True)

    def execute(self, fn: Callable[[], Any]) -> Any:
        """One prompt of one node call, as execution.PromptExecutor.execute_async runs it on
        main.prompt_worker's thread: flag cleared at the start, inference mode, the interrupt
        checked before the node (nodes.before_node_execution). Exceptions come back here."""
        def prompt() -> Any:
            self.mm.interrupt_current_processing(False)
            self.node_threads.add(threading.get_ident())
            with torch.inference_mode():
                self.mm.cleanup_models_gc()
                self.mm.throw_exception_if_processing_interrupted()
                return fn()

        return self._worker.submit(prompt).result()

    def run_node(self, node_cls: type, **inputs: Any) -> Any:
        """execution._async_map_node_over_list for a V1 node: ``getattr(obj, FUNCTION)(**inputs)``."""
        return self.execute(lambda: getattr(node_cls(), node_cls.FUNCTION)(**inputs))

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class OtherModelPatcher:
    """Another ComfyUI model (e.g. the text encoder's ModelPatcher) holding ``size`` bytes of
    simulated device memory; mirrors ModelPatcher's loaded_size/partially_load/
    partially_unload/detach bookkeeping for modules that can all be offloaded."""

    def __init__(self, model: torch.nn.Module, load_device, offload_device, size=0,
                 weight_inplace_update=False) -> None:
        self.model = model
        self.size = size
        self.load_device = load_device
        self.offload_device = offload_device
        self.parent = None
        self.model_options = {"transformer_options": {}}
        self.loaded = 0

    def is_dynamic(self):
        return False

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.loaded

    def current_loaded_device(self):
        return self.load_device if self.loaded else self.offload_device

    def model_patches_to(self, device):
        pass

    def model_patches_models(self):
        return []

    def model_dtype(self):
        return torch.float32

    def lowvram_patch_counter(self):
        return 0

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.loaded
        self.loaded = int(min(self.size, self.loaded + extra_memory))
        return self.loaded - before

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        freed = int(min(self.loaded, memory_to_free))
        self.loaded -= freed
        return freed

    def detach(self, unpatch_all=True):
        self.loaded = 0
        return self.model


def load_other_model(comfy: ComfyUI, size: int, name: str = "TextEncoder") -> OtherModelPatcher:
    """What CLIPTextEncode does first: register a model of ``size`` bytes and load it."""
    module = type(name, (torch.nn.Module,), {})()
    patcher = OtherModelPatcher(module, torch.device("cpu"), torch.device("cpu"), size=size)
    comfy.mm.load_models_gpu([patcher])
    return patcher


@contextlib.contextmanager
def interrupt_when(comfy: ComfyUI, predicate: Callable[[int], bool]):
    """Press Cancel right after a check passed, the first time ``predicate(number of checks
    so far)`` holds: the node must stop at its next check."""
    def hook(count: int) -> None:
        if predicate(count):
            comfy.interrupt()
            comfy.on_interrupt_check = None

    comfy.on_interrupt_check = hook
    try:
        yield
    finally:
        comfy.on_interrupt_check = None
