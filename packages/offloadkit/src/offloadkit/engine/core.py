"""The engine: carries a plan out on a real model and keeps it running.

Two phases, so a model can be prepared while another one runs ("pack now, place later"):

- **stage** (the constructor; safe on a background thread, touches no device): every block
  is packed into its home tier (host buffer, pinned on CUDA, or disk file) block by block,
  freeing the originals as it goes; the model's block tensors point at CPU stand-ins.
- **place** (:meth:`Engine.place`, on the thread that will run the model): non-block tensors
  go to the device once; resident blocks get their own device buffer; streamed blocks share
  ``num_slots`` pre-allocated slots. Each block's ``forward`` is wrapped: before it runs, its
  group must be in a slot (prefetched earlier, or loaded now on a misprediction) and the
  transfers for the next groups are issued; after the last block of a group runs, its slot
  is released for reuse.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from offloadkit.engine import guards, state_hooks, writeback
from offloadkit.engine.homes import Store, open_home
from offloadkit.engine.hooks import ForwardWrapper, excluded_runner, run_block
from offloadkit.engine.layout import (
    BlockLayout,
    TensorEntry,
    TensorRef,
    require_data,
    tensor_nbytes,
    view_in,
)
from offloadkit.engine.modes import engine_mode
from offloadkit.engine.oom import is_oom, lockstep_oom_error, shrink_plan
from offloadkit.engine.packing import release_memory
from offloadkit.engine.placeholders import Placeholders
from offloadkit.engine.profile import ModelLayout, layout_model, with_device_memory
from offloadkit.engine.transfer import CpuTransport, CudaTransport, Ticket
from offloadkit.errors import OffloadError
from offloadkit.ledger import Ledger, OffloadStats, TraceEvent
from offloadkit.placement import Placement
from offloadkit.planner import checked_replan
from offloadkit.plans import ModelProfile, Plan
from offloadkit.units import describe_bytes

if TYPE_CHECKING:
    from offloadkit.strategy import Strategy

MAX_OOM_RETRIES = 4


@dataclass
class Slot:
    """A pre-allocated device buffer holding one transfer group at a time."""

    buffer: torch.Tensor
    group: int | None = None  # group whose bytes are (being) copied in
    ticket: Ticket | None = None
    free_token: Any = None  # CUDA event after the last compute that read the slot
    bound: bool = False  # the group's parameters currently point into this slot
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # block -> tensor views


class Engine(Placement):
    """Mechanism shared by every strategy (see the module docstring). ``StagedModel``
    builds it (staging) and places it; the strategy only supplies plans."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        profile: ModelProfile,
        plan: Plan,
        strategy: Strategy,
        device: torch.device | str,
        budget_bytes: int,
        layout: ModelLayout | None = None,
        pin_limit_bytes: int | None = None,
        disk_path: str | None = None,
        replan_every: int = 8,
        trace: bool = True,
        interrupt_check: Callable[[], None] | None = None,
        process_group: Any = None,
        shared_key: str | None = None,
        shared_dir: str | None = None,
        shared_users: int | None = None,
        shared_timeout_s: float | None = None,
    ) -> None:
        self.model = model
        self.profile = profile
        self.strategy = strategy
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.replan_every = replan_every
        # called between blocks while packing and loading resident blocks: a host's Cancel
        # (ComfyUI's interrupt) raises from it, and the engine restores the model
        self.interrupt_check = interrupt_check
        self.process_group = process_group
        self.ledger = Ledger(max_trace_events=100_000 if trace else 0)
        if layout is None:
            layout = layout_model(model, [model.get_submodule(b.name) for b in profile.blocks])
        self.layout = layout
        self._check_layout(layout, profile)
        self.blocks: tuple[BlockLayout, ...] = layout.blocks
        self.plan = plan
        self._removed = False
        self._wrappers: list[ForwardWrapper] = []
        self._outside: list[tuple[TensorRef, torch.Tensor, torch.Tensor, int]] = []
        self._resident: dict[int, torch.Tensor] = {}
        self._resident_views: dict[int, list[torch.Tensor]] = {}
        self._stand_ins = Placeholders(self.device)
        self._slots: list[Slot] = []
        self._groups: list[tuple[int, ...]] = []
        self._group_of: dict[int, int] = {}
        self._offset_in_group: dict[int, int] = {}
        self._next_group_from: list[int] = []
        self._packed: set[int] = set()
        self._last_block = max((b.index for b in self.blocks), default=-1)
        self._first_block = min((b.index for b in self.blocks), default=-1)
        # one block runs at a time: two threads calling forward share slots and bindings
        self._lock = threading.RLock()
        self._dirty: dict[int, set[int]] = {}  # resident block -> entries written by forward
        self._undo: list[Callable[[], None]] = []  # guards and state_dict hooks to take off
        self._named_modules = list(model.named_modules())
        self._excluded: Callable[..., Any] | None = None  # run_block kept out of torch.compile

        self.placed = False
        self.transport: CpuTransport | CudaTransport | None = None
        try:
            self.store: Store = open_home(
                plan.home, self.ledger, list(self.blocks), self.device,
                pin_limit_bytes=pin_limit_bytes, disk_path=disk_path, shared_key=shared_key,
                shared_dir=shared_dir, shared_users=shared_users,
                shared_timeout_s=shared_timeout_s, interrupt_check=interrupt_check)
        except BaseException:
            self._removed = True  # nothing packed: remove() has nothing to undo
            raise
        try:
            self._pack_blocks()
            self._undo.append(guards.install(self._named_modules))
            self._undo.extend(state_hooks.install(self.blocks, self._named_modules,
                                                  self.read_entry))
        except BaseException:
            self.remove()
            raise

    @engine_mode()
    def place(self, plan: Plan | None = None, budget_bytes: int | None = None) -> None:
        """Put the staged model on the device: non-block tensors, resident blocks, slots,
        forward wrappers. ``plan``/``budget_bytes`` replace the staged ones (a budget read
        at placement time); the home tier stays the staged one. Call it on the thread that
        runs the model. On failure the model is restored and the engine is spent."""
        if self._removed:
            raise OffloadError("this staged model was discarded or removed; stage it again")
        if self.placed:
            raise OffloadError("this staged model is already placed; place() runs once")
        if plan is not None:
            if plan.home != self.plan.home:
                plan = dataclasses.replace(plan, home=self.plan.home)
            self.plan = plan
        if budget_bytes is not None:
            self.budget_bytes = budget_bytes
        start, t = self.ledger.now(), time.perf_counter()
        try:
            if self.device.type == "cuda":
                self.transport = CudaTransport(self.ledger, self.device,
                                               disk=self.plan.home == "disk")
            else:
                self.transport = CpuTransport(self.ledger)
            self._place_outside()
            for block in self.blocks:  # device stand-ins until a block's bytes arrive
                self._bind_block(block.index, self._stand_ins.for_block(block))
            self._configure(self.plan)
            for block_layout, module in zip(self.blocks, self.layout.block_modules, strict=True):
                self._wrappers.append(ForwardWrapper(module, block_layout.index, self._run_block))
        except BaseException:
            self.remove()
            raise
        self.placed = True
        self.ledger.record_place(start, time.perf_counter() - t)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_layout(layout: ModelLayout, profile: ModelProfile) -> None:
        got = [(b.name, b.nbytes) for b in layout.blocks]
        want = [(b.name, b.nbytes) for b in profile.blocks]
        if got != want:
            raise OffloadError("the profile does not describe this model's blocks; build the "
                               "profile from the same model (offloadkit.engine.profile_model)")
        for ref in layout.outside:  # checked here too, so staging fails before packing
            require_data(ref)
        for block in layout.blocks:
            for entry in block.entries:
                t = require_data(entry.ref)
                if t.layout != torch.strided or t.is_quantized:
                    raise OffloadError(
                        f"{entry.ref.qualname!r} is a {t.layout} / quantized torch tensor; "
                        "offloadkit streams dense tensors only (store int8 weights as plain "
                        "int8 buffers plus scales)."
                    )

    def _place_outside(self) -> None:
        """Non-block and shared tensors: moved to the device once and kept there."""
        moved: dict[int, torch.Tensor] = {}
        for ref in self.layout.outside:
            original = require_data(ref)
            if id(original) not in moved:
                with torch.inference_mode(original.is_inference()):  # the kind it was
                    placed = original.to(self.device)
                moved[id(original)] = placed
                self.ledger.device_alloc(tensor_nbytes(placed))
            ref.set(moved[id(original)])
            obj = ref.get()  # what forward may update in place or replace: kept at remove()
            self._outside.append((ref, original, obj, -1 if obj.is_inference() else obj._version))

    def _pack_blocks(self) -> None:
        """Block by block: pack into the home tier, then drop the originals (the block's
        tensors point at CPU stand-ins until :meth:`place` binds device ones)."""
        start, t = self.ledger.now(), time.perf_counter()
        with engine_mode():
            for block in self.blocks:
                if self.interrupt_check is not None:
                    self.interrupt_check()
                self.store.add(block)
                self._packed.add(block.index)
                stand_ins = self._stand_ins.for_block(block, torch.device("cpu"))
                for entry, placeholder in zip(block.entries, stand_ins, strict=True):
                    entry.ref.set(placeholder)
        self.store.finish()
        release_memory()  # the originals' pages, freed block by block, go back to the OS
        self.ledger.record_stage(f"pack {len(self.blocks)} blocks ({self.plan.home})",
                                 start, time.perf_counter() - t)

    # ------------------------------------------------------------------ plan in force
    @engine_mode()
    def _configure(self, plan: Plan) -> None:
        """Make the device match ``plan``: free what leaves first, then allocate."""
        plan.validate(self.profile)
        self.transport.drain()
        for slot in self._slots:
            if slot.bound and slot.group is not None:
                self._unbind_group(slot.group)
            self.ledger.device_free(slot.buffer.numel())
        self._slots = []
        new_resident = set(plan.resident)
        for index in sorted(set(self._resident) - new_resident):
            self._flush(index)
            self._bind_block(index, self._stand_ins.for_block(self.blocks[index]))
            self.ledger.device_free(self._resident.pop(index).numel())
            self._resident_views.pop(index, None)
        for index in sorted(new_resident - set(self._resident)):
            if self.interrupt_check is not None:
                self.interrupt_check()
            block = self.blocks[index]
            buffer = self._allocate(block.nbytes)
            start, t = self.ledger.now(), time.perf_counter()
            self.transport.copy_now(self.store.source(index), buffer)
            self.ledger.record_transfer(f"resident block {index}", block.nbytes, start,
                                        time.perf_counter() - t)
            self._resident[index] = buffer
            views = [view_in(buffer, e, for_model=True) for e in block.entries]
            self._resident_views[index] = views
            self._bind_block(index, views)
        self._groups = plan.groups(self.profile)
        self._group_of = {}
        self._offset_in_group = {}
        slot_bytes = 0
        for g, members in enumerate(self._groups):
            offset = 0
            for index in members:
                self._group_of[index] = g
                self._offset_in_group[index] = offset
                offset += self.blocks[index].nbytes
            slot_bytes = max(slot_bytes, offset)
        # the first group needed at or after each block position (wrapping to the next forward)
        self._next_group_from = []
        for position in range(len(self.blocks) + 1):
            later = [g for g, members in enumerate(self._groups) if members[-1] >= position]
            self._next_group_from.append(later[0] if later else 0)
        for _ in range(plan.num_slots if self._groups else 0):
            buffer = self._allocate(slot_bytes)
            # the allocator may hand out memory that queued compute still reads (a resident
            # block just evicted, an old slot): the first copy in waits for that compute
            self._slots.append(Slot(buffer, free_token=self.transport.release(buffer)))
        if self._slots:
            self.transport.ensure_staging(slot_bytes)
        self.plan = plan
        self._pump(0)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.ledger.current_device_bytes + nbytes > self.budget_bytes:
            raise OffloadError(
                f"engine would exceed the budget: {describe_bytes(self.ledger.current_device_bytes)}"
                f" placed + {describe_bytes(nbytes)} > {describe_bytes(self.budget_bytes)} "
                f"(plan from strategy {self.strategy.name!r} is inconsistent)"
            )
        buffer = self.transport.allocate(nbytes)
        self.ledger.device_alloc(buffer.numel())
        return buffer

    # ------------------------------------------------------------------ binding
    def _bind_block(self, index: int, tensors: list[torch.Tensor]) -> None:
        for entry, tensor in zip(self.blocks[index].entries, tensors, strict=True):
            entry.ref.set(tensor)

    def _slot_views(self, slot: Slot, index: int) -> list[torch.Tensor]:
        views = slot.views.get(index)
        if views is None:
            offset = self._offset_in_group[index]
            region = slot.buffer[offset : offset + self.blocks[index].nbytes]
            views = [view_in(region, e, for_model=True) for e in self.blocks[index].entries]
            slot.views[index] = views
        return views

    def _bind_group(self, slot: Slot) -> None:
        assert slot.group is not None
        for index in self._groups[slot.group]:
            self._bind_block(index, self._slot_views(slot, index))
        slot.bound = True

    def _unbind_group(self, group: int) -> None:
        for index in self._groups[group]:
            self._bind_block(index, self._stand_ins.for_block(self.blocks[index]))
        for slot in self._slots:
            if slot.group == group:
                slot.bound = False

    # ------------------------------------------------------------------ streaming
    def _slot_holding(self, group: int) -> Slot | None:
        for slot in self._slots:
            if slot.group == group:
                return slot
        return None

    def _window(self, position: int) -> list[int]:
        """Groups that should be on the device or on their way, from ``position`` on."""
        count = len(self._groups)
        first = self._next_group_from[position]
        return [(first + k) % count for k in range(min(len(self._slots), count))]

    def _pump(self, position: int) -> None:
        """Issue transfers for the upcoming groups into slots nobody needs any more."""
        if not self._groups or not self._slots:
            return
        window = self._window(position)
        for group in window:
            if self._slot_holding(group) is not None:
                continue
            victim = next((s for s in self._slots if s.group is None), None)
            if victim is None:
                victim = next((s for s in self._slots
                               if s.group not in window and not s.bound), None)
            if victim is None:
                return  # every slot is busy: try again after the next release
            self._issue(group, victim)

    def _issue(self, group: int, slot: Slot) -> None:
        if slot.bound and slot.group is not None:
            # still bound: a forward stopped inside this group (an exception). Order the copy
            # after whatever compute was queued on it, then take the group off the slot.
            slot.free_token = self.transport.release(slot.buffer)
            self._unbind_group(slot.group)
        members = self._groups[group]
        copies = []
        for index in members:
            offset = self._offset_in_group[index]
            dst = slot.buffer[offset : offset + self.blocks[index].nbytes]
            copies.append((self.store.source(index), dst))
        slot.group = group  # views stay valid: a block's offset in a slot is fixed per plan
        slot.ticket = self.transport.submit(f"group {group} ({members[0]}..{members[-1]})",
                                            copies, after=slot.free_token)

    @engine_mode()
    def _before(self, index: int) -> None:
        if index in self._resident:
            self._pump(index)
            return
        group = self._group_of[index]
        slot = self._slot_holding(group)
        if slot is None:  # not predicted (blocks ran out of order): load it now
            self.ledger.mispredicted_loads += 1
            self._pump(index)
            slot = self._slot_holding(group)
            if slot is None:  # every slot bound: left so by a forward that raised
                victim = next((s for s in self._slots if not s.bound), self._slots[0])
                self._issue(group, victim)
                slot = victim
        assert slot.ticket is not None
        self.transport.wait(slot.ticket, index)
        if not slot.bound:
            self._bind_group(slot)
        self._pump(index)

    @engine_mode()
    def _after(self, index: int) -> None:
        if index not in self._resident:
            group = self._group_of[index]
            if index == self._groups[group][-1]:
                slot = self._slot_holding(group)
                if slot is not None and len(self._groups) > len(self._slots):
                    slot.free_token = self.transport.release(slot.buffer)
                    self._unbind_group(group)
            self._pump(min(index + 1, len(self.blocks)))
        if index == self._last_block:
            self._forward_done()

    def _run_block(self, index: int, forward: Callable[..., Any], args: tuple,
                   kwargs: dict) -> Any:
        if self._removed:
            return forward(*args, **kwargs)
        if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:
            # something may compile the model: keep the engine's frames out of its graphs
            if self._excluded is None:
                self._excluded = excluded_runner(
                    self._enter, self._leave, self._failed, self._run_block,
                    *(w.forward for w in self._wrappers[:1]))
            return self._excluded(index, forward, args, kwargs)
        return run_block(index, forward, args, kwargs, self._enter, self._leave, self._failed)

    def _enter(self, index: int, args: tuple, kwargs: dict) -> tuple:
        """Before a block runs: take the lock, refuse what would go wrong, bring its weights."""
        self._lock.acquire()
        try:
            if index == self._first_block:
                guards.refuse_foreign(self._named_modules, "offloadkit forward")
            if torch.is_grad_enabled():
                self._refuse_training(index, args, kwargs)
            return self._begin(index, attempts=0)
        except BaseException:
            self._lock.release()
            raise

    def _begin(self, index: int, *, attempts: int) -> tuple:
        """Bring the block's weights and start its run: the token ``_leave``/``_failed``
        take (compute timing, what forward may write, tries so far)."""
        self._before(index)
        return (self.transport.compute_begin(index), writeback.snapshot(self.blocks[index]),
                attempts)

    def _leave(self, index: int, token: tuple) -> None:
        try:
            self.transport.compute_end(index, token[0])
            self._keep_writes(index, token[1])
            self._after(index)
        finally:
            self._lock.release()

    def _failed(self, index: int, exc: BaseException, token: tuple) -> tuple:
        """An error inside the block: recover from OOM and return a token to run it again,
        else release the lock and re-raise."""
        attempts = token[2]
        try:
            if not isinstance(exc, Exception) or not is_oom(exc) \
                    or attempts >= MAX_OOM_RETRIES:
                raise exc
            self._recover(index, exc)
            return self._begin(index, attempts=attempts + 1)
        except BaseException:
            self._lock.release()
            raise

    def _refuse_training(self, index: int, args: tuple, kwargs: dict) -> None:
        """Autograd would keep the slot tensors for backward, which the next group overwrites
        (silently wrong gradients), and an optimizer would update stand-ins: refused."""
        block = self.blocks[index]
        trained = [e.ref.qualname for e in block.entries if e.ref.get().requires_grad]
        if trained:
            raise OffloadError(
                f"offloadkit is inference-only: block {block.name!r} runs with autograd on and "
                f"{len(trained)} of its tensors require grad (e.g. {trained[0]!r}). Wrap the "
                "call in torch.no_grad() or torch.inference_mode(), or freeze the block "
                "parameters (block.requires_grad_(False)); training through offloaded blocks "
                "is not supported."
            )
        if index in self._resident:
            return  # its weights stay put: backward through it is exact
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            raise OffloadError(
                f"offloadkit is inference-only: streamed block {block.name!r} gets an input that "
                "requires grad (a trainable layer runs before it), and its weights leave the "
                "device before backward needs them. Wrap the call in torch.no_grad() or "
                "torch.inference_mode(), or keep trainable layers after the offloaded blocks."
            )

    # ------------------------------------------------------------------ forward's writes
    def _bound(self, index: int) -> list[torch.Tensor]:
        if index in self._resident:
            return self._resident_views[index]
        slot = self._slot_holding(self._group_of[index])
        assert slot is not None and slot.bound
        return self._slot_views(slot, index)

    @engine_mode()
    def _keep_writes(self, index: int, before: writeback.Snapshot) -> None:
        """Tensors the forward wrote go back to the home tier (a resident block's at the next
        eviction, state_dict() or remove()), so neither the next load nor remove() loses them."""
        positions = writeback.changed(self.blocks[index], before)
        if not positions:
            return
        block, bound = self.blocks[index], self._bound(index)
        for position in positions:
            entry, target = block.entries[position], bound[position]
            now = entry.ref.get()
            if now.data_ptr() != target.data_ptr():  # a new tensor was assigned to the slot
                if now.shape != entry.shape or now.dtype != entry.dtype:
                    raise OffloadError(
                        f"the forward of block {block.name!r} replaced {entry.ref.qualname!r} "
                        f"({tuple(entry.shape)}, {entry.dtype}) with a {tuple(now.shape)} "
                        f"{now.dtype} tensor; offloadkit streams fixed-size block tensors. Keep "
                        "a tensor that changes size outside the offloaded blocks (or update it "
                        "in place)."
                    )
                target.copy_(now.detach())
                entry.ref.set(target)
            if index in self._resident:
                self._dirty.setdefault(index, set()).add(position)
            else:
                self.store.write_entry(index, entry, target)

    @engine_mode()
    def _flush(self, index: int) -> None:
        """Write a resident block's tensors that forward changed back to the home tier."""
        for position in sorted(self._dirty.pop(index, ())):
            self.store.write_entry(index, self.blocks[index].entries[position],
                                   self._resident_views[index][position])

    # ------------------------------------------------------------------ state_dict
    def read_entry(self, index: int, entry: TensorEntry) -> torch.Tensor:
        """One block tensor's real value, as a new CPU tensor read from the home tier."""
        with self._lock, engine_mode():
            if self._removed or index not in self._packed:
                raise OffloadError("this offload was removed; read the model's own tensors")
            if index in self._dirty:
                self._flush(index)
            out = torch.empty(entry.shape, dtype=entry.dtype)
            self.store.read_entry(index, entry, out)
            return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the real block weights (read from the home tier)."""
        return self.model.state_dict()

    def _recover(self, index: int, failure: BaseException) -> None:
        """Evict part of the resident set so activations fit, then let the block rerun."""
        if self.process_group is not None:  # the rerun would repeat the block's collectives
            raise lockstep_oom_error(index, self.process_group) from failure
        shrunk = shrink_plan(self.plan, self.profile, self.budget_bytes)
        if shrunk is None:
            raise OffloadError(
                f"out of memory in block {index} with no resident blocks left to evict "
                f"(plan: {len(self.plan.streamed)} streamed). Lower the activation size "
                "(batch, resolution), or lower the budget to leave more room for activations."
            ) from failure
        self.ledger.oom_recoveries += 1
        self._configure(shrunk)

    def _forward_done(self) -> None:
        self.ledger.forwards += 1
        n = self.ledger.forwards
        if self.replan_every and n >= 2 and (n - 2) % self.replan_every == 0:
            self.replan()  # with a process group, collective: every rank ends this forward

    # ------------------------------------------------------------------ public (via handle)
    @engine_mode()
    def replan(self) -> Plan | None:
        """Ask the strategy for a better plan from measurements; put it in force if any.
        With a ``process_group`` it is collective: the group's first rank decides for all
        (:func:`offloadkit.distributed.coordinated_replan`)."""
        if self.process_group is not None:
            from offloadkit.distributed import coordinated_replan

            return coordinated_replan(self, self.process_group)
        return self._adopt(self._propose_replan(self.budget_bytes))

    def _propose_replan(self, budget_bytes: int) -> Plan | None:
        """The strategy's re-plan from this process's measurements, within ``budget_bytes``."""
        profile = with_device_memory(self.profile, self.device)
        stats = dataclasses.replace(self.stats(settle=False), budget_bytes=budget_bytes)
        return checked_replan(self.strategy, self.plan, stats, profile, budget_bytes)

    def _adopt(self, plan: Plan | None) -> Plan | None:
        """Put ``plan`` in force (on this engine's home tier); None if it places as now."""
        if plan is None or _same_placement(plan, self.plan):
            return None
        plan = dataclasses.replace(plan, home=self.plan.home)
        self._configure(plan)
        self.ledger.replans += 1
        return plan

    def reconfigure(self, plan: Plan, budget_bytes: int) -> None:
        """Put ``plan`` in force under a new budget: for a host that owns device memory and
        grows or shrinks this model's share (comfy_native). What leaves the device is freed
        before anything new is allocated, so shrinking never needs more memory."""
        if not self.placed or self._removed:
            raise OffloadError("reconfigure() needs a placed, live engine")
        plan = dataclasses.replace(plan, home=self.plan.home)
        plan.validate(self.profile)
        if plan.predicted_peak_device_bytes > budget_bytes:
            raise OffloadError(f"plan needs {describe_bytes(plan.predicted_peak_device_bytes)},"
                               f" over the new budget of {describe_bytes(budget_bytes)}")
        self.budget_bytes = budget_bytes
        self._configure(plan)

    def stats(self, *, settle: bool = True) -> OffloadStats:
        """Counters so far. ``settle`` first waits for copies already issued (the prefetch of
        the next forward's first block runs on after a forward returns), so figures read
        between forwards do not depend on how far that copy got; the re-planner reads them
        without waiting."""
        if self.transport is not None:
            if settle:
                try:
                    self.transport.drain()
                except Exception:  # a failed copy is raised where its block waits for it
                    pass
            self.transport.resolve()
        counters = self.ledger.snapshot()
        counters["block_compute_seconds"] = self.ledger.mean_block_seconds()
        return OffloadStats.of(self.plan, strategy=self.strategy.name, device=str(self.device),
                               budget_bytes=self.budget_bytes, counters=counters)

    def trace_events(self) -> list[TraceEvent]:
        if self.transport is not None:
            self.transport.resolve()
        return list(self.ledger.trace)

    @engine_mode()
    def remove(self, *, restore: bool = True) -> None:
        """Put every tensor back where it was (values, device, dtype, requires_grad), drop
        the wrappers, free device memory and the home tier. Safe after a failed set-up.
        ``restore=False``, for a model about to be dropped, leaves the blocks' weights as
        NaN stand-ins (the model is unusable after), saving a full copy of its weights out
        of the home tier."""
        with self._lock:
            self._remove(restore)

    def _remove(self, restore: bool) -> None:
        if self._removed:
            return
        if restore and self.transport is not None:
            for index in list(self._dirty):
                self._flush(index)
        self._removed = True
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        try:
            if self.transport is not None:
                self.transport.close()
        finally:
            for wrapper in self._wrappers:
                wrapper.uninstall()
            self._wrappers = []
            for block in self.blocks:
                if block.index in self._packed:
                    if restore:
                        self._restore_block(block)
                    else:
                        self._drop_block(block)
            for slot in self._slots:
                self.ledger.device_free(slot.buffer.numel())
            self._slots = []
            for buffer in self._resident.values():
                self.ledger.device_free(buffer.numel())
            self._resident.clear()
            self._resident_views.clear()
            placed: set[int] = set()
            kept: dict[int, torch.Tensor] = {}
            for ref, original, obj, version in self._outside:
                current = ref.get()
                if id(current) not in placed:
                    placed.add(id(current))
                    self.ledger.device_free(tensor_nbytes(current))
                written = current is not obj or (version >= 0 and current._version != version)
                if restore and written and (current is not obj
                                            or current.device != original.device):
                    if id(current) not in kept:  # what forward left, where it was (tied once)
                        with torch.inference_mode(original.is_inference()):
                            kept[id(current)] = current.detach().to(original.device, copy=True)
                    ref.set(kept[id(current)])
                else:
                    ref.set(original)
            self._outside = []
            self.store.close()
            self._stand_ins.clear()
            release_memory()

    def _drop_block(self, block: BlockLayout) -> None:
        """Free a block's home-tier copy; its tensors point at CPU stand-ins (no memory), so
        nothing keeps the device slots or resident buffers alive."""
        self._bind_block(block.index, self._stand_ins.for_block(block, torch.device("cpu")))
        self.store.drop(block.index)
        self._packed.discard(block.index)

    def _restore_block(self, block: BlockLayout) -> None:
        """Each tensor gets its own fresh memory again, filled from the home tier."""
        # the disk tier reads tensor by tensor (no whole-block copy); RAM tiers view in place
        raw = None if self.store.tier == "disk" else self.store.read_block(block.index)
        with engine_mode():
            for entry in block.entries:
                if raw is None:
                    restored = torch.empty(entry.shape, dtype=entry.dtype)
                    self.store.read_entry(block.index, entry, restored)
                else:
                    restored = view_in(raw, entry)
                with torch.inference_mode(entry.inference):  # the kind of tensor it was
                    restored = restored.to(entry.original_device, copy=True)
                if entry.ref.kind == "buffer" and entry.requires_grad:
                    restored.requires_grad_(True)
                entry.ref.set(restored)
        del raw
        self.store.drop(block.index)
        self._packed.discard(block.index)


def _same_placement(a: Plan, b: Plan) -> bool:
    return (a.resident, a.streamed, a.group_size, a.prefetch_depth, a.num_slots) == (
        b.resident, b.streamed, b.group_size, b.prefetch_depth, b.num_slots)
