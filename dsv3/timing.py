"""One timing helper for the benchmarks (``benchmarks/``) and the book's timing cells (``dsv3.viz``).

``median_time(fn)`` is the median of ``reps`` timed calls after ``warmup`` untimed ones: on a GPU each call is
bracketed by CUDA events (or, with ``graph=True``, ``inner`` calls are captured in a CUDA graph and replayed, which
leaves pure GPU time without launch overhead); elsewhere it reads ``clock`` (the wall clock by default; the CPU
benchmarks can pass the calling thread's CPU time).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(
    fn: Callable[[], object],
    reps: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    graph: bool = False,
    inner: int = 20,
) -> float:
    """Median seconds per call of `fn` on `device` ("cuda": CUDA events, or a CUDA graph with `graph=True`)."""
    if reps < 1:
        raise ValueError(f"median_time: reps must be >= 1, got {reps}")
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    per_call, run = 1, fn
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm the allocator on the capture stream
            with torch.cuda.graph(g, stream=s):
                for _ in range(inner):
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        torch.cuda.synchronize()
        per_call, run = inner, g.replay
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_call)
    return statistics.median(times)
