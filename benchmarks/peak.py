"""The machine's measured matmul peaks, the yardstick of every "of peak" column in benchmarks/.

    from peak import measure_peaks, share
    peaks = measure_peaks()            # {"fp32": GFLOP/s, "bf16": GFLOP/s} at the current threads
    share(gflops, "bf16", peaks)       # fraction of the bf16 peak a bf16 row reaches

A hard-coded figure goes stale with the machine, the thread count and the load of other jobs;
measuring at the start of a run, at that run's thread count, sets each row against what this
machine gives now. bf16 is timed on bf16 tensors (what autocast hands the matmul kernels).
Nothing runs at import.
"""

from __future__ import annotations

import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` calls (warm up before calling, where it matters)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median GFLOP/s of an [n, n] @ [n, n] matmul (2 n^3 FLOP) after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up: kernel selection, page faults of the output
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def measure_peaks(threads: int | None = None, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}: median n x n x n matmul rate on this machine.

    threads: torch threads to measure at (restored afterwards); None = the current setting, which
    should be the one the benchmark's rows run at."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return {name: _matmul_gflops(n, dtype, repeats) for name, dtype in DTYPES.items()}
    finally:
        torch.set_num_threads(before)


def share(gflops: float, precision: str, peaks: dict[str, float]) -> float:
    """gflops as a fraction of the peak of `precision` ("fp32" | "bf16"; "auto" resolved for CPU)."""
    if precision not in peaks:
        from caredpo.precision import resolve

        precision = resolve(precision, "cpu")
    return gflops / peaks[precision]


def describe(peaks: dict[str, float]) -> str:
    """One header line: 'matmul peaks (measured): fp32 71 GFLOP/s, bf16 190 GFLOP/s'."""
    return "matmul peaks (measured): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
