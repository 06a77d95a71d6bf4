"""The one profiler: peak memory per phase and step timing (docs/measurement.md §Peak memory, §Step timing).

GPU: `max_memory_allocated` / `max_memory_reserved` after `reset_peak_memory_stats` at phase start.
CPU: the process's peak RSS (VmHWM), reset at phase start through /proc/self/clear_refs (Linux >= 4.0).
Step time: device-synchronized wall clock; the first `warmup_steps` steps are excluded; median and p90.
Kernel time (CUDA only): the sum of the device time of every kernel a step launches (torch.profiler), i.e. the
GPU's busy time without the gaps where it waits for the host: the part of a launch-bound step that fusion can cut.
"""
from __future__ import annotations

import gc
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

GIB = float(1 << 30)


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseStats:
    phase: str
    wall_s: float = 0.0
    peak_alloc_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_rss_gib: float | None = None
    start_alloc_gib: float | None = None

    def as_dict(self) -> dict:
        out = {f"{self.phase}_wall_s": self.wall_s}
        for key in ("peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib"):
            value = getattr(self, key)
            if value is not None:
                out[f"{key}_{self.phase}"] = value
        return out


class PhaseMeter:
    """`with PhaseMeter("train", device) as meter: ...` then `meter.stats`."""

    def __init__(self, phase: str, device: torch.device):
        self.stats = PhaseStats(phase)
        self.device = device
        self._t0 = 0.0
        self._rss_reset = False

    def __enter__(self) -> "PhaseMeter":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.stats.start_alloc_gib = torch.cuda.memory_allocated(self.device) / GIB
        self._rss_reset = _reset_peak_rss()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.stats.wall_s = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.stats.peak_alloc_gib = torch.cuda.max_memory_allocated(self.device) / GIB
            self.stats.peak_reserved_gib = torch.cuda.max_memory_reserved(self.device) / GIB
        hwm = _read_status_kib("VmHWM")
        if hwm is not None:
            # Without a reset this is the process-lifetime peak (an upper bound); recorded either way.
            self.stats.peak_rss_gib = hwm * 1024 / GIB


def current_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB
    rss = _read_status_kib("VmRSS")
    return None if rss is None else rss * 1024 / GIB


@dataclass
class StepTimer:
    """Times steps with device sync; summary excludes the first `warmup_steps`."""

    warmup_steps: int
    sync: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.perf_counter
    step_ms: list[float] = field(default_factory=list)
    _t0: float | None = None

    def start(self) -> None:
        self.sync()
        self._t0 = self.clock()

    def stop(self) -> float:
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() without start()")
        self.sync()
        elapsed_ms = (self.clock() - self._t0) * 1000.0
        self.step_ms.append(elapsed_ms)
        self._t0 = None
        return elapsed_ms

    @property
    def measured_ms(self) -> list[float]:
        return self.step_ms[self.warmup_steps :]

    def summary(self) -> dict[str, float | int | None]:
        measured = self.measured_ms
        if not measured:
            return {"step_ms_median": None, "step_ms_p90": None, "measured_steps": 0}
        ordered = sorted(measured)
        # nearest-rank p90
        p90 = ordered[min(len(ordered) - 1, max(0, int(-(-0.9 * len(ordered) // 1)) - 1))]
        return {"step_ms_median": statistics.median(measured), "step_ms_p90": p90, "measured_steps": len(measured)}


@dataclass(frozen=True)
class KernelTime:
    """Device kernel time per step, and where it goes."""

    ms_per_step: float
    top: tuple[tuple[str, float], ...] = ()  # (kernel name, ms per step), the longest first


def kernel_time_per_step(run_steps: Callable[[Callable[[], None]], object], skip_steps: int, active_steps: int,
                         device: torch.device, top: int = 0) -> KernelTime | None:
    """Mean time per step (ms) the GPU spends running kernels, over `active_steps` steps after `skip_steps`
    (CUDA only; None elsewhere), and the `top` kernels by total device time (`top_kernels`).

    `run_steps(after_step)` must run `skip_steps + 1 + active_steps` steps and call `after_step()` after each (one
    profiler warm-up step between the skipped and the recorded ones). Only device activity is traced (no host op
    tracing: cheap), and the union of the device events' intervals is taken, so overlapping kernels count once.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    plan = schedule(wait=skip_steps, warmup=1, active=active_steps, repeat=1)
    with warnings.catch_warnings():  # one cycle only: its note that events are cleared per cycle does not apply
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=[ProfilerActivity.CUDA], schedule=plan) as prof:
            run_steps(prof.step)
    kineto = prof.profiler.kineto_results  # raw events: no FunctionEvent tree (slow to build for a whole model)
    events = [e for e in kineto.events() if e.device_type() == torch.autograd.DeviceType.CUDA and not e.is_async()]
    intervals = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events]
    ranked = top_kernels(((e.name(), e.duration_ns()) for e in events), active_steps, top) if top else ()
    return KernelTime(busy_ns(intervals) / 1e6 / active_steps, ranked)


def kernel_ms_per_step(run_steps: Callable[[Callable[[], None]], object], skip_steps: int, active_steps: int,
                       device: torch.device) -> float | None:
    """`kernel_time_per_step`'s mean kernel time per step (ms); None off CUDA."""
    result = kernel_time_per_step(run_steps, skip_steps, active_steps, device)
    return None if result is None else result.ms_per_step


def top_kernels(events: Iterable[tuple[str, int]], active_steps: int, n: int,
                name_chars: int = 90) -> tuple[tuple[str, float], ...]:
    """The `n` kernel names with the most device time: (name cut to `name_chars`, ms per step), summed over
    every launch of that name, longest first."""
    totals: dict[str, int] = {}
    for name, duration_ns in events:
        totals[name] = totals.get(name, 0) + duration_ns
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:n]
    return tuple((name[:name_chars], ns / 1e6 / active_steps) for name, ns in ranked)


def busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals."""
    total, current_start, current_end = 0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total
