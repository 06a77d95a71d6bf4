"""The profiler's arithmetic with a fake clock (warm-up excluded, median and p90), and phase memory on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorsbench.profiling import PhaseMeter, StepTimer, busy_ns, kernel_ms_per_step


class FakeClock:
    def __init__(self, durations_s):
        self.times = [0.0]
        for d in durations_s:
            self.times += [self.times[-1], self.times[-1] + d]
        self.times = self.times[1:]
        self.i = 0

    def __call__(self):
        t = self.times[self.i]
        self.i += 1
        return t


def test_warmup_excluded_median_and_p90():
    durations = [5.0, 4.0] + [0.1 * k for k in range(1, 11)]  # two slow warm-up steps, then 0.1 .. 1.0 s
    syncs = []
    timer = StepTimer(warmup_steps=2, clock=FakeClock(durations), sync=lambda: syncs.append(1))
    for _ in durations:
        timer.start()
        timer.stop()
    summary = timer.summary()
    assert summary["measured_steps"] == 10
    assert summary["step_ms_median"] == pytest.approx(550.0)
    assert summary["step_ms_p90"] == pytest.approx(900.0)
    assert len(syncs) == 2 * len(durations)  # device synchronized before reading the clock, both ends


def test_no_measured_steps_gives_none():
    timer = StepTimer(warmup_steps=3, clock=FakeClock([1.0]))
    timer.start()
    timer.stop()
    assert timer.summary()["step_ms_median"] is None


def test_stop_without_start_is_an_error():
    with pytest.raises(RuntimeError):
        StepTimer(warmup_steps=0).stop()


def test_cpu_phase_peak_rss_sees_a_large_allocation_and_resets():
    device = torch.device("cpu")
    with PhaseMeter("big", device) as big:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        block.sum()
    del block
    with PhaseMeter("small", device) as small:
        pass
    assert big.stats.peak_rss_gib - small.stats.peak_rss_gib > 0.2
    assert set(big.stats.as_dict()) == {"big_wall_s", "peak_rss_gib_big"}


def test_kernel_time_is_cuda_only():
    ran = []
    assert kernel_ms_per_step(lambda after_step: ran.append(1), 1, 3, torch.device("cpu")) is None
    assert not ran  # nothing is run (or profiled) where there are no kernels to time


def test_busy_time_counts_overlapping_intervals_once():
    assert busy_ns([]) == 0
    assert busy_ns([(10, 20), (0, 5), (15, 30), (40, 41)]) == 5 + 20 + 1
    assert busy_ns([(0, 10), (2, 3)]) == 10


@pytest.mark.gpu
def test_kernel_time_matches_cuda_events_of_a_gemm_loop():
    """Kernel time of a step of back-to-back GEMMs is their CUDA-event time (no host gaps inside), and the host
    gaps a sleep adds between kernels do not enter it."""
    import time

    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def gemms():
        for _ in range(8):
            a @ a

    def run_steps(after_step):
        for _ in range(5):
            gemms()
            time.sleep(0.005)
            after_step()

    for _ in range(20):  # clocks up
        gemms()
    events_ms = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        gemms()
        end.record()
        torch.cuda.synchronize()
        events_ms.append(start.elapsed_time(end))
    kernel_ms = kernel_ms_per_step(run_steps, skip_steps=1, active_steps=3, device=device)
    assert kernel_ms == pytest.approx(min(events_ms), rel=0.2)
    assert kernel_ms < 5.0  # the 5 ms sleep per step is host time, not kernel time
