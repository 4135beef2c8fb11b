"""How gpu_check.py times things on a device, and the rows its tables are made of."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Row = dict[str, str]


class Bench:
    """Times callables on one device: CUDA events around each call after warm-up, with L2
    flushed before each; on CPU, perf_counter."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps
        self.cuda = device.type == "cuda"
        self._flush = (
            torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None
        )

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], warmup: int = 3) -> float:
        """Median seconds per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(self.reps):
            if self._flush is not None:
                self._flush.random_(0, 255)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    def copy_bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (read + write counted), the roofline we compare to."""
        numel = (1 << 30) if self.cuda else (64 << 20)
        src = torch.randn(numel // 4, device=self.device)
        dst = torch.empty_like(src)
        return 2 * numel / self.time(lambda: dst.copy_(src))


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.2f} ms"
