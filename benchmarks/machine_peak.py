"""This machine's arithmetic limits, measured in the run that uses them.

* ``sgemm_gflops``: a float32 matrix product of two ``n × n`` matrices (``torch.mm``, the
  current thread count), 2n³ flop per product: the peak a dense kernel can reach.
* ``dram_gbps``: copying a 256 MiB float32 array (``np.copyto``): bytes read + written per second.
* ``l2_gbps``: the same for a 256 KiB array copied many times (it stays in the L2 cache);
* ``l3_gbps``: the same for an 8 MiB array (it stays in the shared 32 MiB L3).

A part's *arithmetic limit* is ``max(flop / sgemm peak, bytes / bandwidth)`` with the
bandwidth of the level its working set fits in (L2 up to 1 MiB per core here, L3 up to
16 MiB — half of the L3 the other core's jobs share — else DRAM):
no code can be faster than that on this machine, and most small-matrix work cannot reach
the sgemm peak, so it is a lower bound, not a target.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

L2_BYTES = 1 << 20  # per core on this machine (lscpu: 2 MiB over 2 instances)
L3_BYTES = 16 << 20  # half of the shared 32 MiB L3


def _best(fn, repeats):
    times = []
    for _ in range(repeats):  # this thread's CPU time: other jobs on a shared machine do not count
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times), statistics.median(times)


def measure(repeats: int = 5) -> dict:
    """Measured peaks: ``{sgemm_gflops, dram_gbps, l2_gbps, threads}`` (best of ``repeats``, CPU time
    of this thread; the sgemm at 1 thread is what this measures: call with torch at 1 thread)."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    t_mm, _ = _best(lambda: torch.mm(a, b, out=c), repeats)
    big = np.ones(64 << 20, np.float32)  # 256 MiB
    big_out = np.empty_like(big)
    np.copyto(big_out, big)
    t_big, _ = _best(lambda: np.copyto(big_out, big), repeats)
    small = np.ones(64 << 10, np.float32)  # 256 KiB
    small_out = np.empty_like(small)
    reps = 2000

    def copy_small():
        for _ in range(reps):
            np.copyto(small_out, small)

    copy_small()
    t_small, _ = _best(copy_small, repeats)
    mid = np.ones(2 << 20, np.float32)  # 8 MiB
    mid_out = np.empty_like(mid)
    reps_mid = 50

    def copy_mid():
        for _ in range(reps_mid):
            np.copyto(mid_out, mid)

    copy_mid()
    t_mid, _ = _best(copy_mid, repeats)
    return {
        "threads": torch.get_num_threads(),
        "sgemm_gflops": 2 * n**3 / t_mm / 1e9,
        "dram_gbps": 2 * big.nbytes / t_big / 1e9,
        "l2_gbps": 2 * small.nbytes * reps / t_small / 1e9,
        "l3_gbps": 2 * mid.nbytes * reps_mid / t_mid / 1e9,
    }


def limit_seconds(flop: float, nbytes: float, peak: dict, working_set: float | None = None) -> float:
    """``max(flop / sgemm peak, bytes / bandwidth)``; the bandwidth is L2's when ``working_set``
    (bytes, default ``nbytes``) fits in one core's L2, L3's up to ``L3_BYTES``, else DRAM's."""
    ws = nbytes if working_set is None else working_set
    if ws <= L2_BYTES:
        bw = peak["l2_gbps"]
    elif ws <= L3_BYTES and "l3_gbps" in peak:
        bw = peak["l3_gbps"]
    else:
        bw = peak["dram_gbps"]
    return max(flop / (peak["sgemm_gflops"] * 1e9), nbytes / (bw * 1e9))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(measure())
