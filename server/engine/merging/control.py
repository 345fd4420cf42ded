"""Merged mode in the engine: which adapter (if any) is merged into the base, switching between steps, and the LoRA
batches each forward pass needs meanwhile.

Modes: "off" (never merge), "manual" (the API asks: `request_merge` / `request_unmerge`), "auto" (AutoMergePolicy
watches each step's tokens by adapter). A switch happens on the engine thread between two steps, so no batch ever
sees a half-merged model; requests of every adapter keep running in the same batches throughout (the merged one
with no LoRA term, the others with a compensating one, see server.model.merge).

The merged adapter is held in residency for as long as it is merged (its slot's rows feed the compensation term).
A merge waits for its adapter's load without blocking anyone: it is carried out at the first step boundary after the
adapter is on the device.
"""

import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.adapters.residency import Residency
from lora_server.engine.merging.policy import AutoMergePolicy, MergePolicyConfig
from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.model.llama import LlamaModel
from lora_server.model.merge import MergedSlot, merge_slot_, merged_slot_lists, unmerge_

logger = logging.getLogger(__name__)

MergeMode = Literal["off", "manual", "auto"]
MERGE_MODES = ("off", "manual", "auto")


class MergeRefused(RuntimeError):
    """A merge or unmerge the engine will not do as asked (policy off or auto, nothing merged, a load failed, another
    tenant's adapter merged)."""


@dataclass(frozen=True)
class MergeStats:
    mode: MergeMode
    merged: AdapterKey | None
    num_switches: int
    switch_seconds_total: float  # time the step loop spent merging and unmerging
    seconds_merged: float
    seconds_unmerged: float


class MergeControl:
    def __init__(self, model: LlamaModel, residency: Residency | None, mode: MergeMode = "off",
                 policy: MergePolicyConfig | None = None, budget_bytes: int | None = None) -> None:
        if mode not in MERGE_MODES:
            raise ValueError(f"merge policy must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
        self.model = model
        self.residency = residency
        self.mode = mode
        self.policy = AutoMergePolicy(policy or MergePolicyConfig()) if mode == "auto" else None
        self.budget_bytes = budget_bytes  # device bytes for dense copies of an NF4 base's merged layers
        self.device = model.embed_tokens.weight.device
        self.merged_key: AdapterKey | None = None
        self._merged: MergedSlot | None = None
        self._pending: tuple[AdapterKey, Future[int], Future[None]] | None = None  # (key, its hold, the caller's)
        self.num_switches = 0
        self.switch_seconds_total = 0.0
        self._mode_since = time.monotonic()
        self._seconds = {True: 0.0, False: 0.0}  # merged? -> seconds spent so

    # ---------------------------------------------------------------- what a forward pass uses

    def slot_lists(self, token_slots: list[int]) -> tuple[list[int], ...]:
        """The slots of each LoRA batch of a forward pass: the tokens' own, and while merged the compensation's."""
        if self._merged is None:
            return (token_slots,)
        return merged_slot_lists(token_slots, self._merged)

    # ---------------------------------------------------------------- requests (engine thread)

    def request_merge(self, key: AdapterKey) -> Future[None]:
        """Merge `key` at the next step boundary once it is on the device; the future ends when it is merged."""
        done: Future[None] = Future()
        if self.mode != "manual":
            done.set_exception(MergeRefused(f"merging on request needs --merge-policy manual (it is {self.mode})"))
        elif self.residency is None:
            done.set_exception(MergeRefused("this engine serves no adapters"))
        elif key == self.merged_key:
            done.set_result(None)
        elif self._is_held_by_another_tenant(key.tenant):
            # A merge slows every other adapter's requests a little, and a tenant may not undo another's choice; who
            # holds it stays unsaid (tenants learn nothing of each other).
            done.set_exception(MergeRefused("another tenant's adapter is merged (or being merged); try again once it "
                                            "is unmerged"))
        else:
            self._start_merge(key, done)
        return done

    def request_unmerge(self, tenant: str, adapter_id: str) -> None:
        """Unmerge now (between steps), if that adapter (any version) is the merged one."""
        if self.mode != "manual":
            raise MergeRefused(f"unmerging on request needs --merge-policy manual (it is {self.mode})")
        if self.merged_key is None or self.merged_key.lineage != (tenant, adapter_id):
            raise MergeRefused(f"adapter {adapter_id!r} is not merged")
        self._unmerge()

    def _is_held_by_another_tenant(self, tenant: str) -> bool:
        holders = [self.merged_key, self._pending[0] if self._pending is not None else None]
        return any(holder is not None and holder.tenant != tenant for holder in holders)

    def after_step(self, batch: ScheduledBatch | None) -> None:
        """Called by the engine after each step (batch None: nothing ran): feed the policy, carry out what is due."""
        if self.policy is not None and batch is not None:
            tokens_by_key: Counter = Counter()
            for chunk in batch.chunks:
                tokens_by_key[chunk.seq.adapter_key] += chunk.num_tokens
            self.policy.observe(tokens_by_key)
            decision = self.policy.decide(self.merged_key)
            if decision is not None and self._pending is None:
                action, key = decision
                if action == "merge":
                    self._start_merge(key, Future())
                else:
                    self._unmerge()
                self.policy.switched()
        if self._pending is not None and self._pending[1].done():
            self._finish_merge()

    def close(self) -> None:
        if self._merged is not None:
            self._unmerge()

    @property
    def has_pending_merge(self) -> bool:
        """A merge waits for its adapter's load: the engine must keep stepping (even with no requests) to finish it."""
        return self._pending is not None

    # ---------------------------------------------------------------- observation

    def stats(self) -> MergeStats:
        seconds = dict(self._seconds)
        seconds[self._merged is not None] += time.monotonic() - self._mode_since
        return MergeStats(self.mode, self.merged_key, self.num_switches, self.switch_seconds_total, seconds[True],
                          seconds[False])

    # ---------------------------------------------------------------- switching

    def _start_merge(self, key: AdapterKey, done: Future) -> None:
        if self._pending is not None:
            self._pending[2].set_exception(MergeRefused(f"superseded by a merge of {key}"))
            self.residency.release(self._pending[0])
        self._pending = (key, self.residency.acquire(key), done)

    def _finish_merge(self) -> None:
        key, hold, done = self._pending
        self._pending = None
        if hold.exception() is not None:
            self.residency.release(key)
            done.set_exception(MergeRefused(f"cannot merge {key}: {hold.exception()}"))
            return
        if self._merged is not None:
            self._unmerge()
        started = time.monotonic()
        try:
            merged = merge_slot_(self.model, hold.result(), budget_bytes=self.budget_bytes)
        except Exception as error:  # e.g. MergeBudgetError: stay unmerged, say why
            self.residency.release(key)
            done.set_exception(MergeRefused(f"cannot merge {key}: {error}"))
            return
        self._switch_to(merged, key, started)
        done.set_result(None)

    def _unmerge(self) -> None:
        started = time.monotonic()
        unmerge_(self.model, self._merged)
        key = self.merged_key
        self._switch_to(None, None, started)
        self.residency.release(key)

    def _switch_to(self, merged: MergedSlot | None, key: AdapterKey | None, started: float) -> None:
        now = time.monotonic()
        self._seconds[self._merged is not None] += started - self._mode_since
        self._seconds[merged is not None] += now - started  # the switch itself counts toward the new mode
        self._merged, self.merged_key, self._mode_since = merged, key, now
        self.num_switches += 1
        self.switch_seconds_total += now - started
        logger.info("%s in %.1f ms", f"merged {key}" if key else "unmerged", (now - started) * 1e3)
