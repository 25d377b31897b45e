"""Measured and rejected (issue 5, round 2): Gaussian elimination vectorised over a batch of tiny systems.

Usage: PYTHONPATH=. python benchmarks/small_solve.py   (prints accuracy and time vs torch.linalg.solve_ex)

``torch.linalg.solve`` on ~200,000 4 × 4 systems spends most of its time outside the
arithmetic (LAPACK wants each block column-major, so it copies; then it loops over the
blocks one by one). :func:`solve_small` instead stores the batch *last*, ``a`` (M, M, N),
``b`` (M, N), and runs the M steps of Gaussian elimination with partial pivoting (the
same pivot choice as LAPACK's ``getrf``: the first largest ``|a_ik|`` in column ``k``) as
M vectorised torch operations over all N blocks, then back-substitutes. Same algorithm,
so the result agrees with ``torch.linalg.solve`` to float round-off. Worth it for small M
(the per-site Newton blocks, NpS ≲ 8)? Measured: no — 2–4× *slower* than
``torch.linalg.solve_ex`` at M = 2..16 on 1 CPU thread (the M strided elementwise passes
over the whole batch cost more memory traffic than LAPACK's per-block loop), even without
pivoting; so SiteNewton keeps LAPACK and instead builds its Jacobian column-major.
"""

from __future__ import annotations

import torch


def solve_small(a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """Solve ``a[:, :, n] x[:, n] = b[:, n]`` for every ``n``.

    Parameters
    ----------
    a : (M, M, *batch) matrices, batch dimensions last.
    b : (M, *batch) right-hand sides.
    overwrite : allow ``a`` and ``b`` to be used as scratch space (saves two copies).

    Returns
    -------
    x : (M, *batch). A singular block gives non-finite entries in its solution (like
    ``torch.linalg.solve_ex``, no error is raised).
    """
    m = a.shape[0]
    if a.shape[1] != m or b.shape[0] != m or a.shape[2:] != b.shape[1:]:
        raise ValueError(f"solve_small: shapes {tuple(a.shape)}, {tuple(b.shape)} are not (M, M, *batch), (M, *batch)")
    if not overwrite:
        a, b = a.clone(), b.clone()
    for k in range(m):
        if k < m - 1:  # partial pivoting: bring the first largest |a_ik| (i >= k) to row k
            p = a[k:, k].abs().argmax(dim=0)  # (*batch) offsets from k
            row_p = a[k:, k:].gather(0, p.unsqueeze(0).unsqueeze(0).expand(1, m - k, *p.shape))[0]
            b_p = b[k:].gather(0, p.unsqueeze(0))[0]
            row_k, b_k = a[k, k:].clone(), b[k].clone()
            a[k:, k:].scatter_(0, p.unsqueeze(0).unsqueeze(0).expand(1, m - k, *p.shape), row_k.unsqueeze(0))
            b[k:].scatter_(0, p.unsqueeze(0), b_k.unsqueeze(0))
            a[k, k:] = row_p
            b[k] = b_p
            fac = a[k + 1 :, k] / a[k, k]  # (m-k-1, *batch)
            a[k + 1 :, k + 1 :] -= fac.unsqueeze(1) * a[k, k + 1 :].unsqueeze(0)
            b[k + 1 :] -= fac * b[k]
    x = torch.empty_like(b)
    for k in range(m - 1, -1, -1):
        s = b[k]
        if k < m - 1:
            s = s - (a[k, k + 1 :] * x[k + 1 :]).sum(dim=0)
        x[k] = s / a[k, k]
    return x


def main() -> None:
    import time

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for m in (2, 4, 8, 16):
        n = 196_000 if m <= 8 else 20_000
        for cond in ("well", "ill"):
            a = torch.randn(n, m, m, generator=g) - 2 * torch.eye(m)
            if cond == "ill":  # nearly dependent first two rows: condition numbers ~1e4-1e6
                a[:, 1] = a[:, 0] + 1e-4 * torch.randn(n, m, generator=g)
            b = torch.randn(n, m, generator=g)
            truth = torch.linalg.solve(a.double(), b.double())
            at, bt = a.permute(1, 2, 0).contiguous(), b.T.contiguous()
            x_small = solve_small(at, bt).T
            x_lapack = torch.linalg.solve_ex(a, b)[0]

            def err(x, truth=truth):
                return float(((x.double() - truth).norm(dim=1) / truth.norm(dim=1)).nanmedian())

            ts, tl = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                solve_small(at, bt)
                ts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                torch.linalg.solve_ex(a, b)
                tl.append(time.perf_counter() - t0)
            print(f"M={m:2d} {cond:4s} n={n}: median rel. error vs float64 small {err(x_small):.2e} "
                  f"lapack {err(x_lapack):.2e}; seconds small {sorted(ts)[2]:.4f} lapack {sorted(tl)[2]:.4f}")


if __name__ == "__main__":
    main()
