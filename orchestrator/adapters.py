"""LoRA adapter residency (plain Python, no torch, no Triton): which adapters sit in the UNet's static slots,
an LRU over them bounded by the slot bank's size in MiB, loads off the engine thread, and the executor that
turns each row's adapters into slot indices for one shared UNet call.

Policy (measured in perf/addons.py): a request whose adapters are not all resident WAITS outside the engine
while its adapters load on the loader thread; the others keep stepping. It is submitted to the engine once
they are resident, so admission sees its SLO clock (counted from the front's receipt) with the load time
already spent; a request whose SLO cannot outlast the expected load is refused at once (UNAVAILABLE).
Adapters of requests waiting or running are pinned: eviction only takes unpinned ones, least recently used
first. Starting on the base model instead (Katz) changes the image for its first steps; we keep the image
equal to the fused model's."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import Cancelled, ComponentFailed, Rejected, ServingError

log = logging.getLogger(__name__)


class AdapterCache:
    """An LRU of adapter name -> slot (1..slots) with pins; no I/O. `reserve` evicts the least recently used
    unpinned adapter when every slot is taken, and returns None when all of them are pinned."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"adapter cache: {slots} slots is out of range; allowed >= 1")
        self.slots = slots
        self._lru: OrderedDict[str, int] = OrderedDict()  # resident name -> slot, least recent first
        self._pins: dict[str, int] = {}
        self.evictions = 0

    def slot_of(self, name: str) -> int | None:
        return self._lru.get(name)

    def touch(self, name: str) -> None:
        if name in self._lru:
            self._lru.move_to_end(name)

    def resident(self) -> list[str]:
        return list(self._lru)

    def pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        count = self._pins.get(name, 0) - 1
        if count > 0:
            self._pins[name] = count
        else:
            self._pins.pop(name, None)

    def pinned(self, name: str) -> bool:
        return name in self._pins

    def reserve(self, name: str) -> int | None:
        """A slot for `name` (its own if resident), evicting an unpinned adapter if needed; None if all are pinned."""
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        used = set(self._lru.values())
        free = [s for s in range(1, self.slots + 1) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((n for n in self._lru if n not in self._pins), None)
            if victim is None:
                return None
            slot = self._lru.pop(victim)
            self.evictions += 1
        self._lru[name] = slot
        return slot

    def forget(self, name: str) -> None:
        self._lru.pop(name, None)


@dataclass
class Waiter:
    state: Any
    names: tuple[str, ...]
    since: float
    missing: set[str] = field(default_factory=set)


class AdapterResidency:
    """Keeps the adapters of queued and running requests resident.

    `load(name)` reads and converts an adapter (on the loader thread: disk and CPU work); `install(slot,
    adapter)` copies it into a slot of the UNet's bank (the slot is free: no running row reads it).
    `submit(state)` hands a request to the engine (it may raise a ServingError); the observer gets
    `adapter(event, seconds)` calls ("hit", "miss", "eviction", "load")."""

    def __init__(self, cache: AdapterCache, load: Callable[[str], Any], install: Callable[[int, Any], None],
                 submit: Callable[[Any], None] | None = None, observer=None, clock=time.monotonic, workers: int = 1,
                 expected_load_s: float = 0.0):
        self.cache, self._load, self._install, self._submit = cache, load, install, submit
        self.observer, self.clock = observer, clock
        self._lock = threading.Lock()
        self._loading: set[str] = set()
        self._waiters: dict[str, Waiter] = {}  # request id -> waiter
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triffusion-adapters")
        self.expected_load_s = expected_load_s  # a running mean of load times: what admission charges
        self._parked: dict[str, Any] = {}  # loaded adapters that found every slot pinned
        self._stale: set[str] = set()  # replaced on disk while a request used them: reloaded once unpinned
        # What RegisteredAdapters calls when pipeline.json's adapters change (entries, replaced names); set by
        # triffusion.lora.serve, which owns the entries its loader reads.
        self.follow: Callable[[dict, set], None] | None = None
        self.hits = self.misses = self.loads = 0
        self.load_seconds = 0.0

    def connect(self, submit: Callable[[Any], None]) -> None:
        """Where ready requests go (the engine's submit), once the engine exists."""
        self._submit = submit

    # ---- requests --------------------------------------------------------------------------------
    def admit(self, state) -> None:
        """Submit `state` now if its adapters are resident, else once they are (raises what submit raises
        when it runs now, or Rejected when its SLO cannot outlast the load)."""
        names = _names(state)
        if not names:
            self._submit(state)
            return
        with self._lock:
            self._drop_stale(names)
            # resident: in a slot and installed (a name stays in _loading until its install is done)
            missing = {n for n in names if self.cache.slot_of(n) is None or n in self._loading}
            due = _due(state, self.clock())
            if missing and due is not None and self.clock() + self.expected_load_s > due:
                self._count("miss", len(missing))
                raise Rejected(f"adapter(s) {', '.join(sorted(missing))} must load first (about "
                               f"{self.expected_load_s * 1000:.0f} ms), longer than the request's slo_ms allows")
            for name in names:
                self.cache.pin(name)
                self.cache.touch(name)
            state.adapter_pinned = True
            self._count("hit", len(names) - len(missing))
            self._count("miss", len(missing))
            state.adapter_cache = "miss" if missing else "hit"
            state.adapter_wait_s = 0.0
            if missing:
                self._waiters[state.request_id] = Waiter(state, names, self.clock(), set(missing))
                for name in missing - self._loading:
                    self._loading.add(name)
                    self._pool.submit(self._fetch, name)
                return
        self._hand_over(state, deferred=False)

    def cancel(self, request_id: str) -> bool:
        """A waiting request the client gave up on: answered CANCELLED here. False if it is not waiting."""
        with self._lock:
            waiter = self._waiters.pop(request_id, None)
            if waiter is None:
                return False
            self._unpin(waiter.state)
        _fail(waiter.state, Cancelled("cancelled by the client"))
        return True

    def release(self, states) -> None:
        """Requests that left the engine: their adapters may be evicted again."""
        with self._lock:
            for state in states:
                self._unpin(state)
        self._retry()

    def invalidate(self, names) -> None:
        """Adapters whose file was replaced (`add-lora --force` on a served repository): the next request
        that names one loads the new file. A copy that running or waiting requests use stays theirs; the
        first request that names it after they are done gets the new one."""
        with self._lock:
            self._stale.update(names)
            for name in names:
                self._parked.pop(name, None)
            self._drop_stale(list(names))

    def slot_of(self, name: str) -> int:
        slot = self.cache.slot_of(name)
        if slot is None:  # never: a request reaches the engine only with its adapters resident and pinned
            raise ComponentFailed("unet", f"adapter '{name}' is not resident")
        return slot

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + self.misses
            return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / lookups if lookups else None,
                    "loads": self.loads, "load_seconds": self.load_seconds, "evictions": self.cache.evictions,
                    "resident": self.cache.resident(), "waiting": len(self._waiters)}

    # ---- loading (loader thread) -------------------------------------------------------------------
    def _fetch(self, name: str, adapter=None) -> None:
        start = self.clock()
        try:
            if adapter is None:
                adapter = self._load(name)
        except Exception:  # noqa: BLE001 - the waiting requests fail; the log has the reason
            log.exception("adapter %s could not be loaded", name)
            self._failed(name, ComponentFailed(f"adapter '{name}'", "could not be loaded"))
            return
        with self._lock:
            before = self.cache.evictions
            slot = self.cache.reserve(name)
            if slot is None:  # every slot is pinned: it waits for a release (see _retry)
                self._loading.discard(name)
                self._parked[name] = adapter
                return
            evicted = self.cache.evictions - before
        try:
            self._install(slot, adapter)
        except Exception:  # noqa: BLE001
            log.exception("adapter %s could not be installed", name)
            with self._lock:
                self.cache.forget(name)
            self._failed(name, ComponentFailed(f"adapter '{name}'", "could not be installed"))
            return
        seconds = self.clock() - start
        with self._lock:
            self.loads += 1
            self.load_seconds += seconds
            self.expected_load_s = seconds if self.loads == 1 else 0.8 * self.expected_load_s + 0.2 * seconds
            self._loading.discard(name)
            ready = []
            for request_id, waiter in list(self._waiters.items()):
                waiter.missing.discard(name)
                if not waiter.missing and all(self.cache.slot_of(n) is not None for n in waiter.names):
                    del self._waiters[request_id]
                    waiter.state.adapter_wait_s = self.clock() - waiter.since
                    ready.append(waiter)
        self._emit("load", seconds)
        if evicted:
            self._emit("eviction", evicted)
        for waiter in ready:
            self._hand_over(waiter.state, deferred=True)

    def _retry(self) -> None:
        """Adapters that found every slot pinned get another try once something was released."""
        with self._lock:
            names = [n for n in list(self._parked) if n not in self._loading]
            work = [(n, self._parked.pop(n)) for n in names]
            self._loading.update(names)
        for name, adapter in work:
            self._pool.submit(self._fetch, name, adapter)

    def _failed(self, name: str, error: ServingError) -> None:
        with self._lock:
            self._loading.discard(name)
            failed = [w for w in self._waiters.values() if name in w.names]
            for waiter in failed:
                del self._waiters[waiter.state.request_id]
                self._unpin(waiter.state)
        for waiter in failed:
            _fail(waiter.state, error)

    def _hand_over(self, state, deferred: bool) -> None:
        """Into the engine; refused there (queue full, SLO, closed), the request is not running: unpinned,
        and answered here when it waited (the caller answers a refusal it gets at once)."""
        try:
            self._submit(state)
        except ServingError as exc:
            with self._lock:
                self._unpin(state)
            if not deferred:
                raise
            _fail(state, exc)

    # ---- helpers -----------------------------------------------------------------------------------
    def _drop_stale(self, names) -> None:
        """Forget replaced adapters no request holds (under the lock)."""
        for name in names:
            if name in self._stale and not self.cache.pinned(name) and name not in self._loading:
                self.cache.forget(name)
                self._stale.discard(name)

    def _unpin(self, state) -> None:
        """Unpin a request's adapters once (under the lock)."""
        if getattr(state, "adapter_pinned", False):
            state.adapter_pinned = False
            for name in _names(state):
                self.cache.unpin(name)

    def _count(self, event: str, n: int) -> None:
        if n <= 0:
            return
        if event == "hit":
            self.hits += n
        else:
            self.misses += n
        self._emit(event, n)

    def _emit(self, event: str, value) -> None:
        if self.observer is not None:
            try:
                self.observer.adapter(event, value)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("adapter metrics failed")


class RegisteredAdapters:
    """The adapters pipeline.json registers, followed while serving: `add-lora` on a served repository
    rewrites the file (atomically) and the next request sees the new names, with no restart. Each call costs
    a stat; the file is read again only when it changed. Only `lora.adapters` is followed: anything else in
    the file (sizes, slots, models) takes effect at the next load. `on_change(entries, replaced)` gets the
    new adapter entries and the names whose file changed (by sha256)."""

    def __init__(self, path: str | Path, limits, entries: dict | None = None,
                 on_change: Callable[[dict, set], None] | None = None):
        self.path, self._limits, self._on_change = Path(path), limits, on_change
        self._entries = dict(entries or {})
        self._lock = threading.Lock()
        self._stamp = self._stat()

    def limits(self):
        """The limits with the adapter names registered now."""
        stamp = self._stat()
        if stamp == self._stamp:
            return self._limits
        with self._lock:
            if stamp != self._stamp:
                self._refresh(stamp)
            return self._limits

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self, stamp) -> None:
        self._stamp = stamp
        try:
            entries = dict((json.loads(self.path.read_text()).get("lora") or {}).get("adapters") or {})
        except (OSError, ValueError, AttributeError):
            log.exception("%s could not be read again; the adapters registered before stay", self.path)
            return
        if entries == self._entries:
            return
        replaced = {name for name, entry in entries.items()
                    if name in self._entries and self._entries[name] != entry}
        if self._on_change is not None:
            self._on_change(entries, replaced)
        self._entries = entries
        self._limits = replace(self._limits, adapters=tuple(sorted(entries)))
        log.info("adapters registered now: %s", ", ".join(sorted(entries)) or "none")


def _due(state, now: float) -> float | None:
    """When the request's SLO runs out, counted from its receipt at the front (or now)."""
    slo = state.params.slo_ms
    if slo is None:
        return None
    return (state.received if state.received is not None else now) + slo / 1000.0


def _names(state) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for name, _ in state.params.lora))


def _fail(state, error: ServingError) -> None:
    try:
        state.sink.fail(error)
    except Exception:  # noqa: BLE001 - the client is gone
        log.warning("final answer of %s could not be sent", state.request_id)


class AdapterExecutor:
    """An executor whose adapter UNet runs in this process with per-row adapter slots: every row of a call
    (with adapters or none) shares it. Other models go to the wrapped executor."""

    def __init__(self, base, unet_model: str, runtime, residency: AdapterResidency, per_request: int,
                 controlled: tuple[str, Any] | None = None):
        """`controlled`: (the controlled UNet's model name, the adapter runtime taking `residuals` too), so
        that requests with a ControlNet may carry adapters."""
        self.base, self.unet_model, self.runtime = base, unet_model, runtime
        self.residency, self.per_request = residency, per_request
        self.control_model, self.control_runtime = controlled or (None, None)

    def encode(self, input_ids):
        return self.base.encode(input_ids)

    def decode(self, latent):
        return self.base.decode(latent)

    def score(self, images, prompts=None):
        return self.base.score(images, prompts)

    def controlnet(self, *args, **kwargs):
        return self.base.controlnet(*args, **kwargs)

    def denoise(self, model, sample, timestep, text_embeddings, adapters=None, **extra):
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings}
        if model == self.unet_model and not extra:
            runtime = self.runtime
        elif model == self.control_model and set(extra) == {"residuals"}:
            runtime = self.control_runtime
            inputs["residuals"] = extra["residuals"]
        else:
            if adapters and any(adapters):  # the runner retries each request alone: LoRA ones come back here
                raise ComponentFailed(model, "serves no LoRA adapters (the default UNet, with or without control, does)")
            return self.base.denoise(model, sample, timestep, text_embeddings, **extra)
        slots, scales = self.rows(len(sample), adapters)
        return runtime.run({**inputs, "adapter_slots": slots, "adapter_scales": scales})["noise_pred"]

    def rows(self, count: int, adapters) -> tuple[np.ndarray, np.ndarray]:
        """Per-row (slot, scale) pairs, (count, per_request); slot 0 = no adapter."""
        slots = np.zeros((count, self.per_request), np.int64)
        scales = np.zeros((count, self.per_request), np.float32)
        for row, pairs in enumerate(adapters or ()):
            for k, (name, scale) in enumerate(pairs):
                slots[row, k] = self.residency.slot_of(name)
                scales[row, k] = scale
        return slots, scales

    def release(self, states) -> None:
        self.residency.release(states)
