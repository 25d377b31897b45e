"""Linear readouts of frozen representations: the papers' LinearSVC, solved exactly and fast.

Three readouts, one interface (:func:`fit_readout` → :class:`LinearReadout`):

``svc`` (default)
    The primal problem that ``sklearn.svm.LinearSVC(C, class_weight='balanced')`` hands to
    liblinear (solver ``L2R_L2LOSS_SVC``), one-vs-rest. For class ``c`` with targets
    ``t_i = +1`` if ``y_i = c`` else ``−1`` and the augmented input ``x̃_i = [x_i, s]``
    (``s`` = ``intercept_scaling``; the intercept is regularised, as in liblinear)::

        f_c(w) = ½ ‖w‖² + Σ_i C_i max(0, 1 − t_i wᵀx̃_i)²,
        C_i = C · q_c  if y_i = c  else  C        (q_c = n / (k · n_c), 'balanced')

    — liblinear weights the positives of each one-vs-rest problem by their class weight and
    leaves the negatives at ``C`` (``train_one(…, weighted_C[c], C)`` in its ``train``).
    Solved by a truncated Newton method (Lin, Weng & Keerthi, "Trust region Newton method for
    large-scale logistic regression", JMLR 2008, the method of liblinear's TRON): conjugate
    gradients on the generalised Hessian ``H_c = I + 2 X̃ᵀ D_c X̃`` (``D_c`` = ``C_i`` on the
    active set ``1 − t_i wᵀx̃_i > 0``) with a diagonal preconditioner (or a block-Jacobi one over
    the sites of site-major features, ``block``), then an exact line search
    on the piecewise-quadratic objective. All ``k`` classes advance together, so every
    product with the data is one matrix–matrix product of width ``k``. It stops with
    liblinear's test, per class: ``‖∇f_c(w)‖ ≤ ε_c ‖∇f_c(0)‖``, ``ε_c = tol · min(n⁺_c, n⁻_c) / n``
    — a test on the gradient at the current point relative to the gradient at zero, so a warm
    start (``w0``, e.g. the previous evaluation's solution) stops at the same accuracy.
``liblinear``
    ``sklearn.svm.LinearSVC`` itself, for cross-checks.
``ridge``
    One-vs-rest least squares with targets ±1 and an unregularised intercept, solved exactly
    by one Cholesky factorisation: ``(X_cᵀX_c + α I) W = X_cᵀ T`` on centred features —
    ``sklearn.linear_model.RidgeClassifier(alpha)``'s solution. A cheap exact instrument for
    relative comparisons; it is not the papers' number.

:func:`fit_linear_probe` is the self-supervised pipelines' probe (Tang, Yang & Amit 2022):
one linear layer trained with cross-entropy and Adam on mini-batches of frozen features
(standardised with the training statistics only when asked: the authors' probe is not).

Shapes: features ``(n, d)``, labels ``(n,)`` integers ``0 … k−1``; weights ``(d + 1, k)`` whose
last row multiplies the constant input (scores = ``X W[:-1] + W[-1]``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dynsim.errors import ConfigError, DataError

READOUTS = ("svc", "liblinear", "ridge")


@dataclass
class LinearReadout:
    """A fitted linear classifier: ``scores = features @ weights[:-1] + weights[-1]``.

    ``info`` holds what the fit learned about itself (iterations, products, objective,
    convergence).
    """

    weights: torch.Tensor  # (d + 1, k)
    info: dict = field(default_factory=dict)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return (features.to(w.dtype) @ w[:-1] + w[-1]).argmax(dim=1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(features) == labels).to(torch.float64).mean())


# elements of the data per row chunk (16 MiB of float32) in every pass over it: products,
# float64 objective, Gram blocks, preconditioner (benchmarks/readout_memory.py times the
# chunked products against one product with the whole matrix and with a transposed copy)
CHUNK_ELEMENTS = 2**22


class _Design:
    """The augmented design ``X̃ = [X, s]`` (n, d + 1) of liblinear's bias, never formed.

    Every product goes through the caller's ``X`` (n, d) and the constant column ``s``
    (``intercept_scaling``) separately: ``W X̃ᵀ = W_{:d} Xᵀ + s W_d`` and
    ``A X̃ = [A X, s A 1]`` — one stored copy of the features instead of three (``X``, ``X̃``
    and ``X̃ᵀ``). Every pass runs over row chunks of :data:`CHUNK_ELEMENTS` elements, so the
    temporaries (float64 copies, squares, augmented rows) are chunk-sized.
    """

    def __init__(self, x: torch.Tensor, scaling: float):
        self.x, self.s = x, float(scaling)
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))

    def _spans(self):
        n = self.x.shape[0]
        return ((i, min(i + self.chunk, n)) for i in range(0, n, self.chunk))

    def scores(self, w_t: torch.Tensor) -> torch.Tensor:
        """``W X̃ᵀ`` (k, n) from weights ``W`` (k, d + 1)."""
        z = w_t.new_empty(w_t.shape[0], self.x.shape[0])
        w, b = w_t[:, :-1], w_t[:, -1:] * self.s
        for i, j in self._spans():
            torch.addmm(b, w, self.x[i:j].T, out=z[:, i:j])
        return z

    def t_product(self, a: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``A X̃`` (k, d + 1) from ``A`` (k, n); with ``idx``, over those rows only
        (``Σ_{i ∈ idx} a_{:, i} x̃_iᵀ`` from ``A`` (k, |idx|), each chunk gathered)."""
        n = self.x.shape[0] if idx is None else idx.numel()
        out = a.new_zeros(a.shape[0], self.x.shape[1])
        for i in range(0, n, self.chunk):
            rows = self.x[i : i + self.chunk] if idx is None else self.x[idx[i : i + self.chunk]]
            out.addmm_(a[:, i : i + self.chunk], rows)
        return torch.cat([out, self.s * a.sum(dim=1, keepdim=True)], dim=1)

    def gauss_newton_product(self, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(C ∘ (P X̃ᵀ)) X̃`` (k, d + 1) from ``P`` (k, d + 1) and ``C`` (k, n), chunk by chunk
        (each chunk of ``X`` is used twice while it is in cache)."""
        out = p.new_zeros(p.shape[0], self.x.shape[1])
        w, b = p[:, :-1], p[:, -1:] * self.s
        bias = p.new_zeros(p.shape[0], 1)
        for i, j in self._spans():
            xc = self.x[i:j]
            cz = c[:, i:j] * torch.addmm(b, w, xc.T)
            out.addmm_(cz, xc)
            bias += cz.sum(dim=1, keepdim=True)
        return torch.cat([out, self.s * bias], dim=1)

    def rows(self, idx: torch.Tensor | None = None):
        """``X̃`` in row chunks (of the rows ``idx``, all when None), each (m, d + 1)."""
        n = self.x.shape[0] if idx is None else idx.numel()
        for i in range(0, n, self.chunk):
            xr = self.x[i : i + self.chunk] if idx is None else self.x[idx[i : i + self.chunk]]
            yield i, torch.cat([xr, xr.new_full((xr.shape[0], 1), self.s)], dim=1)

    def squared_t_product(self, a: torch.Tensor) -> torch.Tensor:
        """``A (X̃ ∘ X̃)`` (k, d + 1), chunked (no full-size square of the data)."""
        out = a.new_zeros(a.shape[0], self.x.shape[1] + 1)
        for i, xr in self.rows():
            out += a[:, i : i + xr.shape[0]] @ (xr * xr)
        return out

    def scores64(self, w_t: torch.Tensor) -> torch.Tensor:
        """``W X̃ᵀ`` (k, n) in float64, chunked (a float64 copy of the data would be 2× its size)."""
        w64 = w_t.double()
        return torch.cat([w64 @ xr.double().T for _, xr in self.rows()], dim=1)

    def gram(self, idx: torch.Tensor, weights: torch.Tensor, *, exact: bool = False,
             block: int | None = None) -> torch.Tensor:
        """``Σ_i c_i x̃_i x̃_iᵀ`` float64 over the rows ``idx`` with weights ``c`` (m,): the whole
        (d + 1, d + 1) matrix, or with ``block`` = b only its diagonal b×b blocks (nb, b, b) —
        the blocks of consecutive coordinates of ``x̃`` zero-padded to ``nb = ⌈(d + 1)/b⌉``
        blocks (:func:`block_layout`), n·(d + 1)·b multiply-adds instead of n·(d + 1)². Each
        chunk's product in the data's dtype (float64 when ``exact``), summed in float64."""
        d1 = self.x.shape[1] + 1
        nb = d1 if block is None else -(-d1 // block)
        shape = (d1, d1) if block is None else (nb, block, block)
        out = torch.zeros(shape, dtype=torch.float64, device=self.x.device)
        for i, xr in self.rows(idx):
            c = weights[i : i + xr.shape[0]]
            if exact:
                xr, c = xr.double(), c.double()
            if block is None:
                out += ((xr * c[:, None]).T @ xr).double()
                continue
            xb = torch.nn.functional.pad(xr, (0, nb * block - d1)).view(-1, nb, block).transpose(0, 1)  # (nb, m, b)
            out += ((xb * c[None, :, None]).transpose(1, 2) @ xb).double()
        return out


def block_layout(d1: int, block: int) -> tuple[int, int]:
    """``(nb, pad)``: a vector of ``d1`` coordinates cut into ``nb = ⌈d1/b⌉`` consecutive blocks
    of ``b`` after ``pad = nb·b − d1`` zeros at its end (the augmented weights ``[w, b]``: with
    ``d = nb'·b`` site-structured features, blocks ``0 … nb'−1`` are the sites and the last one
    holds the intercept alone)."""
    nb = -(-d1 // block)
    return nb, nb * block - d1


def svc_sample_costs(labels: torch.Tensor, k: int, *, C: float, class_weight: str | None,
                     dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``t`` (k, n) in ±1 and liblinear's per-sample costs ``C_i`` (k, n).

    ``class_weight='balanced'`` gives class ``c`` the weight ``n / (k n_c)``, applied to the
    positives of the one-vs-rest problem ``c`` only (liblinear); ``None``: all costs ``C``.
    """
    n = labels.shape[0]
    cols = torch.arange(n, device=labels.device)
    t = torch.full((k, n), -1.0, dtype=dtype, device=labels.device)
    t[labels, cols] = 1.0
    costs = torch.full((k, n), float(C), dtype=dtype, device=labels.device)
    if class_weight == "balanced":
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        q = (n / (k * counts.clamp_min(1))).to(dtype)
        costs[labels, cols] = C * q[labels]
    elif class_weight is not None:
        raise ConfigError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
    return t, costs


# CG products run over a copy of the rows that are active for some running class when they are at
# most this fraction of the data (rows outside every active set add 0 to H_c p); above it the
# copy would cost more than it saves
COMPACT_FRACTION = 0.7

# CG's default forcing per stopping rule of fit_svc: liblinear's TRON (residual) and NEWTON (quadratic)
CG_FORCING = {"residual": 0.1, "quadratic": 0.5}

# the coarse space's dimension ℓ of fit_svc(coarse="auto") (benchmarks/readout_precond.py)
COARSE_RANK = 128

# feature dimension up to which Newton directions come from the exact Hessian blocks (k dense
# (d+1)² matrices); above it, from conjugate gradients (memory O(n k) instead of O(k d²))
EXACT_HESSIAN_MAX_DIM = 4096


@torch.no_grad()
def fit_svc(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_classes: int | None = None,
    C: float = 1.0,
    tol: float = 1e-4,
    class_weight: str | None = "balanced",
    intercept_scaling: float = 1.0,
    w0: torch.Tensor | None = None,
    max_iter: int = 1000,
    direction: str = "auto",
    cg_stop: str = "residual",
    cg_forcing: float | None = None,
    max_cg: int = 500,
    block: int | None = None,
    coarse: int | str | None = "auto",
) -> LinearReadout:
    """LinearSVC's one-vs-rest primal problem (module docstring) by Newton's method.

    Each iteration solves ``H_c s_c = −∇f_c`` for every class, then takes the exact line
    search step. ``direction`` says how:

    ``"hessian"``: the exact generalised Hessian ``H_c = I + 2 A_c``, ``A_c = Σ_{i active}
    C_i x̃_i x̃_iᵀ``, factorised by Cholesky (float64). ``A_c`` is kept between iterations and
    changed by the rows that entered or left the active set (or rebuilt from the active rows
    when that is fewer); from ``w = 0`` every row is active and ``A_c = C G + C (q_c − 1) G_c``
    from the per-class Gram matrices ``G_c`` (``G = Σ_c G_c``), one pass over the data.
    ``"cg"``: conjugate gradients on ``H_c`` through products with the data (liblinear's
    TRON does this) — with only the rows active for some running class, since the others add
    nothing to ``H_c p`` (near the optimum a few per cent of the (row, class) pairs are active) —
    stopped by ``cg_stop`` (:func:`_cg_direction`): ``"residual"`` at ``‖r_c‖ ≤ cg_forcing ‖∇f_c‖``
    (forcing 0.1 by default, liblinear's TRON), ``"quadratic"`` when the i-th iteration lowers the
    quadratic model by at most ``tol_c / i`` of its value, ``tol_c = min(cg_forcing,
    ‖∇f_c‖_{M⁻¹}^{1/2})`` (forcing 0.5 by default, liblinear's NEWTON), and preconditioned by ``M_c`` =
    the diagonal of ``H_c`` (``block`` None, liblinear's choice) or, with ``block`` = b, the
    block-Jacobi matrix: ``H_c``'s diagonal b×b blocks of consecutive coordinates of
    ``x̃`` (:func:`block_layout`), i.e. for site-major DSSM rates with b = NpS the
    within-site correlations ``I + 2 Σ_{i active} C_i x̃_{i,s} x̃_{i,s}ᵀ`` of each site
    ``s`` (Saad, "Iterative methods for sparse linear systems", 2003, §10.1 on block
    Jacobi). Its blocks are kept between iterations like the exact ``A_c`` (updated by the
    rows that entered or left the active set; n·(d + 1)·b multiply-adds for a rebuild,
    against n·(d + 1)² for the whole matrix) and factorised by Cholesky. The preconditioner
    changes only how fast CG converges, not the Newton systems, the line search or the
    stopping test: the same minimum.
    ``coarse`` = ℓ adds a coarse space to that preconditioner ``B_c`` (diagonal or block-Jacobi):
    ``U`` (d + 1, ℓ), the ℓ leading right singular vectors of ``X̃`` (randomized range finder
    with one power iteration, Halko, Martinsson & Tropp, SIAM Review 2011, alg. 4.3), computed
    once — the directions shared by all sites (the features' mean, their leading components),
    along which ``H_c`` is large and a per-site ``B_c`` is far from it. With ``E_c = Uᵀ H_c U``
    and ``Q_c = U E_c⁻¹ Uᵀ`` the preconditioner is the balancing one
    ``P_c = (I − Q_c H_c) B_c⁻¹ (I − H_c Q_c) + Q_c`` (Mandel, "Balancing domain
    decomposition", 1993; Tang, Nabben, Vuik & Erlangga, J. Sci. Comput. 2009, "A-DEF2"),
    symmetric positive definite: CG solves ``H_c`` exactly on span ``U`` and ``B_c`` handles the
    rest. ``H_c U`` costs 2 ℓ (d + 1) multiply-adds per active row of class ``c``, so the coarse
    space is used only in the Newton iterations whose CG runs over a compacted copy of the rows
    (:data:`COMPACT_FRACTION`; from w = 0 every row is active and few CG iterations are needed).
    ``"auto"``: ``"hessian"`` up to :data:`EXACT_HESSIAN_MAX_DIM` features, else ``"cg"``.

    Memory: the features are held once (the caller's tensor); the intercept column and every
    float64 or elementwise pass are handled in row chunks (:class:`_Design`), so the fit needs
    O(n k) for scores and slacks (+ the k float64 Hessian blocks with ``"hessian"``) beyond them.

    Parameters
    ----------
    features : (n, d) float tensor; labels : (n,) long in ``0 … k−1``.
    C, tol, class_weight, intercept_scaling : as ``sklearn.svm.LinearSVC`` (``tol`` is
        liblinear's ``eps``; its stopping test is in the module docstring).
    w0 : (d + 1, k) start (warm start); zeros when None. The stopping test does not depend on it.
    max_iter : Newton iterations at most (LinearSVC's ``max_iter``).
    cg_stop, cg_forcing : CG's stopping rule, ``"residual"`` or ``"quadratic"``, and its forcing
        (None: 0.1 or 0.5, liblinear's for each); CG directions only.
    block : the CG preconditioner's block size in ``1 … d + 1`` (``"cg"`` only; None: diagonal).
    coarse : the coarse space's dimension ℓ in ``1 … d + 1`` (``"cg"`` only; None: none;
        ``"auto"``: :data:`COARSE_RANK` above :data:`EXACT_HESSIAN_MAX_DIM` features, where
        ``"auto"`` directions are CG, else none).

    Returns
    -------
    :class:`LinearReadout`; ``info`` has ``newton_iterations``, ``cg_iterations``,
    ``cg_per_newton`` (CG iterations of each Newton iteration: its slowest class's),
    ``cg_per_class`` (each Newton iteration's CG iterations per class, k ints; a class that has
    met its stopping rule costs no more products: :class:`_LiveProducts`), ``cg_rows`` (at most the rows its CG products
    ran over: only the rows active for some running class, :data:`COMPACT_FRACTION`), ``preconditioner_seconds``
    (building and factorising the block-Jacobi blocks and the coarse space's ``E_c``, ``H_c U``),
    ``coarse_seconds`` (computing ``U`` and ``Z``, once, part of ``preconditioner_seconds``;
    absent when never used), ``products``
    (products with the data, of width k or, in CG, the live classes), ``gram_rows`` (rows that went into
    Hessian blocks),
    ``objective`` (per class, float64), ``gradient_ratio`` (‖∇f_c‖ / ‖∇f_c(0)‖), ``converged``,
    ``direction``, ``block``, ``coarse`` (ℓ or None).
    """
    n, d = features.shape
    if labels.shape != (n,):
        raise DataError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
    if direction == "auto":
        direction = "hessian" if d + 1 <= EXACT_HESSIAN_MAX_DIM else "cg"
    if direction not in ("hessian", "cg"):
        raise ConfigError(f"direction must be 'auto', 'hessian' or 'cg', got {direction!r}")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    dtype, device = features.dtype, features.device
    x = _Design(features, intercept_scaling)  # X̃ = [X, s] (n, d+1), never formed
    t, costs = svc_sample_costs(labels, n_classes, C=C, class_weight=class_weight, dtype=dtype)
    binary = n_classes == 2
    if binary:  # liblinear: one problem, class 1 positive (cost C q_1), class 0 negative (C q_0)
        costs = torch.where(t[1] > 0, costs[1], costs[0])[None]
        t = t[1:]
        if w0 is not None and tuple(w0.shape) == (d + 1, 2):
            w0 = w0[:, 1:]
    k = t.shape[0]
    pos = (t > 0).sum(dim=1).to(torch.float64)
    eps = tol * torch.clamp(torch.minimum(pos, n - pos), min=1.0) / n  # (k,)
    if not isinstance(cg_stop, str) or cg_stop not in CG_FORCING:
        raise ConfigError(f"cg_stop must be 'residual' or 'quadratic', got {cg_stop!r}")
    try:
        forcing = CG_FORCING[cg_stop] if cg_forcing is None else float(cg_forcing)
    except (TypeError, ValueError):
        raise ConfigError(f"cg_forcing must be a number in (0, 1), got {cg_forcing!r}") from None
    if not 0.0 < forcing < 1.0:
        raise ConfigError(f"cg_forcing must be in (0, 1), got {cg_forcing!r}")
    if block is not None and not 1 <= int(block) <= d + 1:
        raise ConfigError(f"block must be an integer in 1 … d + 1 = {d + 1} (e.g. the neurons per site), got {block!r}")
    if coarse == "auto":
        coarse = min(COARSE_RANK, d + 1) if d + 1 > EXACT_HESSIAN_MAX_DIM else None
    if coarse is not None and (isinstance(coarse, str) or not 1 <= int(coarse) <= d + 1):
        raise ConfigError(
            f"coarse must be an integer in 1 … d + 1 = {d + 1} (the coarse space's dimension), got {coarse!r}")
    stats = {"products": 0, "cg_iterations": 0, "gram_rows": 0, "cg_per_newton": [], "cg_per_class": [], "cg_rows": [],
             "preconditioner_seconds": 0.0}

    def gradient(w_t: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
        """∇f (k, d+1) from the weights (k, d+1) and the slacks max(0, 1 − t z) (k, n)."""
        stats["products"] += 1
        return w_t - 2.0 * x.t_product(costs * t * slack)

    g0_norm = torch.linalg.vector_norm(  # the gradient at zero, where every slack is 1
        gradient(torch.zeros(k, d + 1, dtype=dtype, device=device), torch.ones_like(costs)).double(), dim=1)
    w_t = torch.zeros(k, d + 1, dtype=dtype, device=device)
    if w0 is not None:
        if tuple(w0.shape) != (d + 1, k):
            raise ConfigError(f"w0 has shape {tuple(w0.shape)}, expected {(d + 1, k)}")
        w_t = w0.T.to(dtype=dtype, device=device).contiguous()
    z = x.scores(w_t)  # (k, n)
    stats["products"] += 1
    slack = (1.0 - t * z).clamp_min_(0.0)
    g = gradient(w_t, slack)
    g_norm = torch.linalg.vector_norm(g.double(), dim=1)
    target = eps * g0_norm
    blocks = _HessianBlocks(x, labels, costs, k) if direction == "hessian" else None
    jacobi = _HessianBlocks(x, labels, costs, k, block=int(block)) if direction == "cg" and block else None
    space = None  # the coarse space, built at its first use
    newton = 0
    while newton < max_iter and bool((g_norm > target).any()):
        newton += 1
        # the classes are k independent problems: one that has passed its test stays where it is
        running = g_norm > target
        active = slack > 0
        if blocks is not None:
            s = blocks.newton_direction(active, g, running, stats)
        else:
            precond = None
            if jacobi is not None:
                t_pre = time.perf_counter()
                classes = torch.nonzero(running).squeeze(1)
                chol = jacobi.factor(active, classes, stats)
                stats["preconditioner_seconds"] += time.perf_counter() - t_pre

                def precond(r, live, chol=chol, running=running):
                    out = r.clone()  # identity for the classes whose CG has stopped
                    out[live] = jacobi.solve(chol[live[running]], r[live]).to(r.dtype)
                    return out

            # the rows of some running class's Hessian; CG copies them (_LiveProducts) when they are few
            n_rows = int(active[running].any(dim=0).sum())
            compacted = n_rows <= COMPACT_FRACTION * n
            stats["cg_rows"].append(n_rows if compacted else n)
            two_level = None
            if coarse and compacted:
                t_pre = time.perf_counter()
                space = space or _CoarseSpace(x, int(coarse), stats)
                two_level = space.factor(costs * active, torch.nonzero(running).squeeze(1))
                stats["preconditioner_seconds"] += time.perf_counter() - t_pre
            s = _cg_direction(x, costs * active, g, cg_stop, forcing, max_cg, stats, running, precond, two_level)
        xs = x.scores(s)
        stats["products"] += 1
        step = _line_search(w_t, s, z, xs, t, costs)
        w_t += step[:, None] * s
        z = x.scores(w_t)  # afresh rather than z + α X̃s: no drift of the scores
        stats["products"] += 1
        slack = (1.0 - t * z).clamp_min_(0.0)
        g = gradient(w_t, slack)
        g_norm = torch.linalg.vector_norm(g.double(), dim=1)
    w64 = w_t.double()  # the objective per class, in float64 from the final weights
    z64 = x.scores64(w_t)
    obj = 0.5 * (w64**2).sum(dim=1) + (costs.double() * (1.0 - t.double() * z64).clamp_min(0.0) ** 2).sum(dim=1)
    info = {
        "newton_iterations": newton,
        **stats,
        "objective": obj.cpu().numpy(),
        "gradient_ratio": (g_norm / g0_norm).cpu().numpy(),
        "converged": bool((g_norm <= target).all()),
        "direction": direction,
        "block": None if direction == "hessian" or not block else int(block),
        "coarse": None if direction == "hessian" or not coarse else int(coarse),
    }
    weights = w_t.T.contiguous()
    if binary:  # scores (−z, z): argmax is liblinear's sign rule
        weights = torch.cat([-weights, weights], dim=1)
    return LinearReadout(weights, info)


class _HessianBlocks:
    """``A_c = Σ_{i active in c} C_i x̃_i x̃_iᵀ`` for every class, kept along the iterations:
    the whole (d + 1)² matrix, or with ``block`` = b its diagonal b×b blocks only
    (:func:`block_layout`; the block-Jacobi preconditioner of the CG directions).

    The rank updates go through float32 (or the data's dtype) matrix products and are
    accumulated in float64; ``I + 2 A_c`` (or each of its blocks) is factorised by a batched
    float64 Cholesky factorisation.
    """

    def __init__(self, x: _Design, labels: torch.Tensor, costs: torch.Tensor, k: int, block: int | None = None):
        self.x, self.labels, self.costs, self.k, self.block = x, labels, costs, k, block
        self.d1 = x.x.shape[1] + 1
        if block is None:
            shape = (k, self.d1, self.d1)
        else:
            self.nb, self.pad = block_layout(self.d1, block)
            shape = (k, self.nb, block, block)
        self.a = torch.zeros(shape, dtype=torch.float64, device=x.x.device)
        self.active: torch.Tensor | None = None  # (k, n) the active sets A_c was built for

    def _gram(self, rows: torch.Tensor, weights: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return self.x.gram(rows, weights, exact=exact, block=self.block)

    def update(self, active: torch.Tensor, classes: list[int], stats: dict) -> None:
        """Bring ``A_c`` of ``classes`` to the active sets ``active`` (k, n)."""
        x, costs = self.x, self.costs
        if self.active is None and bool(active.all()):
            # every row active (w = 0): A_c = Σ_j C_cj G_j over the label groups j, G_j their
            # Gram matrices, C_cj the cost that problem c gives to the rows of label j
            for j in torch.unique(self.labels).tolist():
                rows = torch.nonzero(self.labels == j).squeeze(1)
                gram = self._gram(rows, torch.ones(rows.numel(), dtype=x.x.dtype, device=x.x.device))
                stats["gram_rows"] += rows.numel()
                for c in range(self.k):
                    self.a[c] += float(costs[c, rows[0]]) * gram
            self.active = active.clone()
            return
        if self.active is None:
            self.active = torch.zeros_like(active)
        for c in classes:
            changed = torch.nonzero(active[c] ^ self.active[c]).squeeze(1)
            now = torch.nonzero(active[c]).squeeze(1)
            if changed.numel() == 0:
                continue
            if changed.numel() < now.numel():
                sign = torch.where(active[c][changed], 1.0, -1.0).to(costs.dtype)
                self.a[c] += self._gram(changed, sign * costs[c][changed])
                stats["gram_rows"] += changed.numel()
            else:
                self.a[c] = self._gram(now, costs[c][now]) if now.numel() else 0.0
                stats["gram_rows"] += now.numel()
            self.active[c] = active[c]

    def _hessian(self, classes: torch.Tensor) -> torch.Tensor:
        h = 2.0 * self.a[classes]
        h.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return h

    def factor(self, active: torch.Tensor, classes: torch.Tensor, stats: dict) -> torch.Tensor:
        """Cholesky factors of ``I + 2 A_c`` (or of its blocks) for ``classes``, at ``active``."""
        self.update(active, classes.tolist(), stats)
        chol, failed = torch.linalg.cholesky_ex(self._hessian(classes))
        failed = failed.reshape(len(classes), -1).ne(0).any(dim=1)
        if bool(failed.any()):
            # rounding in the rank updates (large features, many removals) lost definiteness:
            # rebuild those blocks from the active rows in float64, where I + 2 A_c is definite
            for c in classes[failed].tolist():
                rows = torch.nonzero(active[c]).squeeze(1)
                self.a[c] = self._gram(rows, self.costs[c][rows], exact=True)
                stats["gram_rows"] += rows.numel()
            chol = torch.linalg.cholesky(self._hessian(classes))
        return chol

    def solve(self, chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``(I + 2 A_c)⁻¹ rhs_c`` (or its block-diagonal part's) for the factored classes,
        ``rhs`` (m, d + 1) in any float dtype; float64 result."""
        r = rhs.double()
        if self.block is None:
            return torch.cholesky_solve(r[:, :, None], chol)[:, :, 0]
        m = r.shape[0]
        rb = torch.nn.functional.pad(r, (0, self.pad)).view(m, self.nb, self.block, 1)
        return torch.cholesky_solve(rb, chol).view(m, self.nb * self.block)[:, : self.d1]

    def newton_direction(self, active: torch.Tensor, g: torch.Tensor, running: torch.Tensor,
                         stats: dict) -> torch.Tensor:
        """``s_c = −(I + 2 A_c)⁻¹ ∇f_c`` for the running classes, 0 for the others (k, D)."""
        classes = torch.nonzero(running).squeeze(1)
        chol = self.factor(active, classes, stats)
        s = torch.zeros_like(g)
        s[classes] = self.solve(chol, -g[classes]).to(g.dtype)
        return s


class _CoarseSpace:
    """The coarse space ``U`` (d + 1, ℓ) of :func:`fit_svc`'s balancing preconditioner and
    ``Z = X̃ U`` (n, ℓ), computed once; :meth:`factor` builds ``E_c = Uᵀ H_c U`` and ``H_c U``
    for the running classes at the current active sets."""

    def __init__(self, x: _Design, rank: int, stats: dict, seed: int = 0):
        t0 = time.perf_counter()
        self.x = x
        d1 = x.x.shape[1] + 1
        gen = torch.Generator(device=x.x.device).manual_seed(seed)
        omega = torch.randn(rank, d1, generator=gen, dtype=x.x.dtype, device=x.x.device)
        u = torch.linalg.qr(x.t_product(x.scores(omega)).T).Q  # range of X̃ᵀX̃ Ω
        u = torch.linalg.qr(x.t_product(x.scores(u.T)).T).Q  # one power iteration
        self.u = u  # (d + 1, ℓ) orthonormal
        self.z = x.scores(u.T).T.contiguous()  # X̃ U (n, ℓ)
        stats["coarse_seconds"] = time.perf_counter() - t0

    def factor(self, active_cost: torch.Tensor, classes: torch.Tensor) -> _TwoLevel:
        """``E_c⁻¹`` (Cholesky, float64) and ``H_c U = U + 2 X̃ᵀ D_c Z`` of ``classes``
        (over each class's active rows only); ``active_cost`` (k, n) is ``D_c``'s diagonal."""
        k = active_cost.shape[0]
        rank = self.u.shape[1]
        hu = self.u.new_zeros(k, self.u.shape[0], rank)
        e = torch.eye(rank, dtype=torch.float64, device=self.u.device).repeat(k, 1, 1)
        for c in classes.tolist():
            idx = torch.nonzero(active_cost[c] > 0).squeeze(1)
            z = self.z[idx]  # Z on the active rows
            zc = z * active_cost[c, idx, None]  # D_c Z
            e[c] += 2.0 * (z.T @ zc).double()
            hu[c] = self.u + 2.0 * self.x.t_product(zc.T, idx).T
        return _TwoLevel(self.u, hu, torch.linalg.cholesky(e))


@dataclass
class _TwoLevel:
    """The balancing preconditioner ``P_c r = (I − Q_c H_c) B_c⁻¹ (I − H_c Q_c) r + Q_c r``,
    ``Q_c = U E_c⁻¹ Uᵀ``, for the classes :meth:`_CoarseSpace.factor` factored."""

    u: torch.Tensor  # (D, ℓ)
    hu: torch.Tensor  # (k, D, ℓ) H_c U
    chol: torch.Tensor  # (k, ℓ, ℓ) Cholesky factors of E_c

    def _e_solve(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (m, ℓ) → E_c⁻¹ v_c
        return torch.cholesky_solve(v.double()[:, :, None], self.chol[c])[:, :, 0]

    def apply(self, r: torch.Tensor, base, live: torch.Tensor) -> torch.Tensor:
        """``P_c r_c`` for the ``live`` classes (among those factored), ``base(r, live)`` = ``B⁻¹``."""
        c = torch.nonzero(live).squeeze(1)
        u, hu = self.u, self.hu[c]
        rc = r[c]
        a = self._e_solve(rc @ u, c).to(r.dtype)  # E⁻¹ Uᵀ r
        q = r.clone()
        q[c] = rc - torch.bmm(hu, a[:, :, None])[:, :, 0]  # (I − H Q) r
        q = base(q, live).to(r.dtype)  # B⁻¹ (…)
        qc = q[c]
        b = self._e_solve(torch.bmm(qc[:, None, :], hu)[:, 0, :], c).to(r.dtype)  # E⁻¹ (HU)ᵀ q
        q[c] = qc - b @ u.T + a @ u.T
        return q


def _cg_direction(x: _Design, active_cost, g, stop: str, forcing: float, max_cg, stats, running, precond=None,
                  two_level=None) -> torch.Tensor:
    """Preconditioned CG on ``(I + 2 X̃ᵀ D_c X̃) s_c = −∇f_c``, all classes at once (k, D).

    ``precond(r, live)`` (k, D) → ``M_c⁻¹ r_c`` for the ``live`` classes (k,) bool, ``r_c`` for the
    others; the diagonal ``M_c = diag(H_c)`` when None. With
    ``two_level`` (a :meth:`_CoarseSpace.factor`) that preconditioner is the ``B_c`` of the
    balancing one. Classes not ``running`` take no step (0). Each class stops by ``stop``:

    ``"residual"``: at ``‖r_c‖ ≤ forcing ‖∇f_c‖``.
    ``"quadratic"``: when CG's i-th iteration lowers the quadratic model
    ``Q_c(s) = ∇f_cᵀ s + ½ sᵀ H_c s`` by at most ``tol_c / i`` of its value,
    ``i (Q_c(s_i) − Q_c(s_{i−1})) ≥ tol_c Q_c(s_i)``, ``tol_c = min(forcing, ‖∇f_c‖_{M⁻¹}^{1/2})``
    (or when ``Q_c`` rises: rounding). This is liblinear's ``NEWTON::pcg`` (newton.cpp, forcing
    0.5; Nash & Sofer, Oper. Res. Lett. 1990; Hsia, Chiang & Lin, ACML 2018):
    the directions along which the residual lingers but the model no longer falls cost no more
    iterations. Either way the Newton systems, the line search and the stopping test are the same.

    The products and the preconditioner run for the live classes only (:class:`_LiveProducts`).
    """
    s = torch.zeros_like(g)
    r = -g
    g64 = g.double()
    residual_tol = forcing * torch.linalg.vector_norm(g64, dim=1)
    live = running & (torch.linalg.vector_norm(g64, dim=1) > (residual_tol if stop == "residual" else 0.0))
    products = _LiveProducts(x, active_cost)
    if precond is None:  # diag(H_c) (k, d+1) of the live classes, over their rows
        products.restrict(live)
        diag = torch.ones_like(g)
        diag[products.classes] += 2.0 * products.design.squared_t_product(products.cost)
        stats["products"] += 1

        def precond(r, live):
            return torch.where(live[:, None], r / diag, r)

    if two_level is not None:
        base = precond

        def precond(r, live):
            return two_level.apply(r, base, live)

    zr = precond(r, live).to(g.dtype)
    p = zr.clone()
    rz = (r * zr).sum(dim=1, dtype=torch.float64)
    model_tol = torch.clamp(rz.clamp_min(0.0).sqrt().sqrt(), max=forcing)  # min(forcing, ‖g‖_{M⁻¹}^{1/2})
    model = torch.zeros_like(rz)  # Q_c(s_{i−1})
    per_class = torch.zeros(g.shape[0], dtype=torch.long)
    iterations = 0
    for _ in range(max_cg):
        if not bool(live.any()):
            break
        hp = products.hessian(p, live)
        stats["products"] += 2
        iterations += 1
        per_class += live.cpu()
        php = (p * hp).sum(dim=1, dtype=torch.float64)
        alpha = torch.where(live, rz / php.clamp_min(1e-300), torch.zeros_like(rz)).to(g.dtype)[:, None]
        s += alpha * p
        r -= alpha * hp
        if stop == "residual":
            live &= torch.linalg.vector_norm(r.double(), dim=1) > residual_tol
        else:
            new_model = -0.5 * ((s * r).sum(dim=1, dtype=torch.float64) - (s.double() * g64).sum(dim=1))
            fall = new_model - model
            settled = (new_model > 0) | (fall > 0) | (iterations * fall >= model_tol * new_model)
            live &= ~settled
            model = new_model
        if not bool(live.any()):
            break
        zr = precond(r, live).to(g.dtype)
        rz_new = (r * zr).sum(dim=1, dtype=torch.float64)
        beta = torch.where(live, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz)).to(g.dtype)[:, None]
        p = zr + beta * p
        rz = rz_new
    stats["cg_iterations"] += iterations
    stats["cg_per_newton"].append(iterations)
    stats["cg_per_class"].append(per_class.tolist())
    s[~running] = 0.0
    return s


class _LiveProducts:
    """``H_c p_c = p_c + 2 X̃ᵀ D_c X̃ p_c`` (k, D) for the classes still live in CG (0 for the
    others, whose step CG no longer changes), over the rows active for some live class.

    Classes stop one by one, and late Newton systems often run hundreds of CG iterations for
    one or two hard classes. The products are bound by reading the rows, not by how many
    classes share them, so what saves is dropping the rows of the classes that have stopped
    (benchmarks/readout_precond.py's ``+allclasses`` baseline). Rows outside every live class's
    active set add 0 to the products, so when the live classes' rows are at most :data:`COMPACT_FRACTION` of the rows of
    the first restriction (all of ``x``, or the copy of the running classes' rows that the first
    restriction made), they are copied out of ``x`` — one copy at a time, the previous one freed
    first (from ``w = 0`` every row is active and nothing is copied).
    """

    def __init__(self, x: _Design, active_cost: torch.Tensor):
        self.x, self.active_cost = x, active_cost
        self.key, self.idx, self.design = None, None, x  # idx: the copied rows of x (None: all)
        self.base = x.x.shape[0]  # rows after the first restriction

    def restrict(self, live: torch.Tensor) -> None:
        """Products for the ``live`` classes (k,) bool from now on (``classes``, ``design``, ``cost``)."""
        classes = torch.nonzero(live).squeeze(1)
        rows = (self.active_cost[classes] > 0).any(dim=0)
        if int(rows.sum()) <= COMPACT_FRACTION * self.base:
            self.design = None  # the previous copy goes before the next is made
            self.idx = torch.nonzero(rows).squeeze(1)
            self.design = _Design(self.x.x.index_select(0, self.idx), self.x.s)
        if self.key is None:
            self.base = self.design.x.shape[0]
        cost = self.active_cost[classes]
        self.classes, self.cost = classes, cost if self.idx is None else cost[:, self.idx]
        self.key = live.clone()

    def hessian(self, p: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        if self.key is None or not torch.equal(self.key, live):
            self.restrict(live)
        hp = torch.zeros_like(p)
        pc = p[self.classes]
        hp[self.classes] = pc + 2.0 * self.design.gauss_newton_product(pc, self.cost)
        return hp


def _line_search(w_t, s, z, xs, t, costs, iterations: int = 20) -> torch.Tensor:
    """Exact minimiser ``α_c`` of ``φ_c(α) = f_c(w + α s)`` for each class (k,).

    ``φ`` is a convex piecewise quadratic: ``φ'(α) = wᵀs + α sᵀs − 2 Σ C_i t_i (X̃s)_i ξ_i(α)``
    with slacks ``ξ_i(α) = max(0, 1 − t_i (z_i + α (X̃s)_i))``; solved by 1-D Newton from
    ``α = 1`` (the Newton step), which ends in finitely many steps once the active set
    settles. Cost O(n k) per iteration: no product with the data.
    """
    ws = (w_t.double() * s.double()).sum(dim=1)
    ss = (s.double() ** 2).sum(dim=1)
    ts = (t * xs).double()
    tz = (t * z).double()
    c = costs.double()
    lo = torch.zeros_like(ws)
    hi = torch.full_like(ws, float("inf"))
    alpha = torch.ones_like(ws)
    for _ in range(iterations):
        slack = 1.0 - tz - alpha[:, None] * ts
        on = slack > 0
        d1 = ws + alpha * ss - 2.0 * (c * ts * slack * on).sum(dim=1)
        d2 = ss + 2.0 * (c * ts * ts * on).sum(dim=1)
        lo = torch.where(d1 < 0, alpha, lo)
        hi = torch.where(d1 >= 0, alpha, hi)
        new = alpha - d1 / d2.clamp_min(1e-300)
        outside = (new <= lo) | (new >= hi)  # safeguard: bisect the bracket (φ' is monotone)
        new = torch.where(outside & torch.isfinite(hi), 0.5 * (lo + hi), torch.where(outside, 2 * lo, new))
        done = (new - alpha).abs() <= 1e-10 * alpha.abs().clamp_min(1.0)
        alpha = new
        if bool(done.all()):
            break
    return alpha.clamp_min(0.0).to(w_t.dtype)


@torch.no_grad()
def fit_ridge(features: torch.Tensor, labels: torch.Tensor, *, n_classes: int | None = None,
              alpha: float = 1.0) -> LinearReadout:
    """One-vs-rest ridge regression on ±1 targets, intercept unregularised (exact, one solve).

    Solves ``(X_cᵀ X_c + α I) W = X_cᵀ T_c`` with ``X_c``, ``T_c`` the centred features and
    targets (``T_ic = +1`` if ``y_i = c`` else −1), intercept ``b = t̄ − x̄ᵀ W`` — the solution of
    ``sklearn.linear_model.RidgeClassifier(alpha)`` for k > 2 classes (for two, the same
    decision). The Gram matrix is formed in the features' dtype and solved in float64
    (Cholesky).
    """
    n, d = features.shape
    k = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    t = torch.full((n, k), -1.0, dtype=features.dtype, device=features.device)
    t[torch.arange(n, device=features.device), labels] = 1.0
    mean_x, mean_t = features.mean(dim=0), t.mean(dim=0)
    xc = features - mean_x
    gram = (xc.T @ xc).double()
    gram.diagonal().add_(alpha)
    rhs = (xc.T @ (t - mean_t)).double()
    w = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))
    b = mean_t.double() - mean_x.double() @ w
    weights = torch.cat([w, b[None]], dim=0).to(features.dtype)
    return LinearReadout(weights, {"alpha": alpha, "converged": True})


def fit_liblinear(features: torch.Tensor, labels: torch.Tensor, *, n_classes: int | None = None, C: float = 1.0,
                  tol: float = 1e-4, max_iter: int = 1000) -> LinearReadout:
    """``sklearn.svm.LinearSVC(C, class_weight='balanced', tol, max_iter)`` itself (liblinear,
    primal for n > d as ``dual='auto'`` chooses), as a :class:`LinearReadout` for cross-checks."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = features.cpu().numpy()
    y = labels.cpu().numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LinearSVC(C=C, class_weight="balanced", dual="auto", tol=tol, max_iter=max_iter, random_state=0)
        model.fit(x, y)
    coef = np.vstack([model.coef_.T, model.intercept_[None]])  # (d+1, k) or (d+1, 1) for two classes
    if coef.shape[1] == 1:
        coef = np.hstack([-coef, coef])
    weights = torch.as_tensor(coef, dtype=features.dtype, device=features.device)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return LinearReadout(weights, {"newton_iterations": int(np.max(model.n_iter_)), "converged": converged})


def paired_difference(pred: np.ndarray, pred_base: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy difference of two classifiers on the same test images, with its standard error
    over images: ``d̄ = mean(c_i − b_i)``, ``se = std(c_i − b_i, ddof=1) / √M`` with ``c_i, b_i``
    ∈ {0, 1} the per-image correctness (a paired comparison: the same M images)."""
    diff = (np.asarray(pred) == y).astype(np.float64) - (np.asarray(pred_base) == y).astype(np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return {"difference": float(diff.mean()), "se_test_images": se}


def fit_readout(name: str, features: torch.Tensor, labels: torch.Tensor, *, n_classes: int | None = None,
                w0: torch.Tensor | None = None, block: int | None = None, tol: float = 1e-4) -> LinearReadout:
    """Fit the readout ``name`` (one of :data:`READOUTS`); ``w0`` warm-starts ``svc`` and
    ``block`` (e.g. the neurons per site of site-major rates) is its CG preconditioner's block
    size (:func:`fit_svc`; the same minimum, fewer CG iterations); ``tol`` is liblinear's
    stopping tolerance for ``svc`` and ``liblinear`` (LinearSVC's default 1e-4; ridge is exact)."""
    if name == "svc":
        return fit_svc(features, labels, n_classes=n_classes, w0=w0, block=block, tol=tol)
    if name == "ridge":
        return fit_ridge(features, labels, n_classes=n_classes)
    if name == "liblinear":
        return fit_liblinear(features, labels, n_classes=n_classes, tol=tol)
    raise ConfigError(f"unknown readout {name!r}; choose one of {', '.join(READOUTS)}")


def readout_accuracy(name: str, f_train, y_train, f_test, y_test, *, w0: torch.Tensor | None = None,
                     device: str | torch.device = "cpu", block: int | None = None, tol: float = 1e-4) -> dict:
    """Fit readout ``name`` on (f_train, y_train) and score it (``w0``, ``block``, ``tol``: :func:`fit_readout`).

    Returns ``accuracy`` (test), ``train_accuracy``, ``readout_seconds``, ``readout_converged``,
    ``readout_iterations`` (Newton iterations; 0 for ridge), ``test_predictions`` (M,) int8 and
    ``weights`` ((d + 1, k), e.g. to warm-start the next fit).
    """
    t0 = time.perf_counter()
    ftr = torch.as_tensor(np.asarray(f_train), dtype=torch.float32, device=device)
    fte = torch.as_tensor(np.asarray(f_test), dtype=torch.float32, device=device)
    ytr = torch.as_tensor(np.asarray(y_train), dtype=torch.long, device=device)
    yte = torch.as_tensor(np.asarray(y_test), dtype=torch.long, device=device)
    if ftr.ndim != 2 or fte.ndim != 2 or ftr.shape[1] != fte.shape[1] or len(ftr) != len(ytr) or len(fte) != len(yte):
        raise DataError(f"feature/label shapes disagree: train {tuple(ftr.shape)} / {tuple(ytr.shape)}, "
                        f"test {tuple(fte.shape)} / {tuple(yte.shape)}")
    if not (torch.isfinite(ftr).all() and torch.isfinite(fte).all()):
        raise DataError("features contain NaN or Inf; the representation diverged")
    k = int(max(int(ytr.max()), int(yte.max()))) + 1
    model = fit_readout(name, ftr, ytr, n_classes=k, w0=w0, block=block, tol=tol)
    pred = model.predict(fte)
    return {
        "accuracy": float((pred == yte).to(torch.float64).mean()),
        "train_accuracy": model.accuracy(ftr, ytr),
        "readout_seconds": time.perf_counter() - t0,
        "readout_converged": bool(model.info.get("converged", True)),
        "readout_iterations": int(model.info.get("newton_iterations", 0)),
        "test_predictions": pred.to(torch.int8).cpu().numpy(),
        "weights": model.weights,
    }


def _as_tensor(a, dtype) -> torch.Tensor:
    return (
        a.to(dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype)
    )


def fit_linear_probe(
    f_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    f_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    standardize: bool = True,
) -> dict:
    """Train a linear classifier on frozen features and report accuracy.

    Parameters
    ----------
    f_train, f_test : (N, D) and (M, D) features.
    y_train, y_test : (N,) and (M,) integer labels in ``0..C−1``.
    epochs : passes over the training features.
    lr : Adam learning rate.
    batch_size : mini-batch size.
    seed : seeds the weights and the batch order.
    device : where to train.
    standardize : centre and scale each feature with the training statistics first.

    Returns
    -------
    dict with ``test_accuracy``, ``train_accuracy`` (fractions in [0, 1]), ``epochs``,
    ``n_features``, ``seconds``.

    Examples
    --------
    >>> f = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([0, 0, 1, 1])
    >>> fit_linear_probe(f, y, f, y, epochs=300, lr=0.1, batch_size=4, seed=0)["test_accuracy"]
    1.0
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(
            f"probe epochs = {epochs}, batch_size = {batch_size}, lr = {lr}: "
            f"all must be positive (e.g. epochs=20, batch_size=256, lr=1e-3)"
        )
    t0 = time.perf_counter()
    device = torch.device(device)
    xtr = _as_tensor(f_train, torch.float32).to(device).flatten(1)
    xte = _as_tensor(f_test, torch.float32).to(device).flatten(1)
    ytr = _as_tensor(y_train, torch.long).to(device)
    yte = _as_tensor(y_test, torch.long).to(device)
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1] != xte.shape[1]:
        raise DataError(
            f"feature/label shapes disagree: train {tuple(xtr.shape)} / {tuple(ytr.shape)}, "
            f"test {tuple(xte.shape)} / {tuple(yte.shape)}"
        )
    if not (torch.isfinite(xtr).all() and torch.isfinite(xte).all()):
        raise DataError("features contain NaN or Inf; the encoder diverged (lower the lr)")
    if standardize:
        mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    n_classes = int(max(ytr.max(), yte.max())) + 1
    weight, bias = train_softmax_layer(xtr, ytr, n_classes, epochs=epochs, lr=lr, batch_size=batch_size,
                                       generator=torch.Generator().manual_seed(seed), progress=progress)
    with torch.no_grad():
        acc_train = ((xtr @ weight.T + bias).argmax(1) == ytr).float().mean().item()
        acc_test = ((xte @ weight.T + bias).argmax(1) == yte).float().mean().item()
    return {
        "test_accuracy": acc_test,
        "train_accuracy": acc_train,
        "epochs": epochs,
        "n_features": int(xtr.shape[1]),
        "seconds": time.perf_counter() - t0,
    }


def train_softmax_layer(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, epochs: int, lr: float,
                        batch_size: int, generator: torch.Generator,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear layer ``s = W x + b`` trained by Adam on the mean softmax cross-entropy.

    From ``W = 0, b = 0``, each epoch draws a permutation of the ``n`` rows of ``x`` (n, d)
    from ``generator`` and takes one Adam step (``torch.optim.Adam``, lr ``lr``, default
    betas) per mini-batch of ``batch_size`` rows. The gradients are written in closed form
    instead of by autograd: with ``P = softmax(X_b Wᵀ + b)`` and ``Y`` the one-hot labels of
    the batch (B rows), ``G = (P − Y)/B``, ``∇_W = Gᵀ X_b``, ``∇_b = Σ_i G_i`` — the gradient
    of ``F.cross_entropy`` (mean reduction), the same steps as ``nn.Linear`` + autograd up to
    float rounding, and faster on CPU (``benchmarks/ssl_step.py``).

    Returns ``(W (k, d), b (k,))``, detached.
    """
    n, d = x.shape
    weight = torch.nn.Parameter(torch.zeros(n_classes, d, dtype=x.dtype, device=x.device))
    bias = torch.nn.Parameter(torch.zeros(n_classes, dtype=x.dtype, device=x.device))
    opt = torch.optim.Adam([weight, bias], lr=lr)
    rows = torch.empty(min(batch_size, n), d, dtype=x.dtype, device=x.device)  # reused: no allocation per batch
    with torch.no_grad():
        for _ in tqdm(range(epochs), desc="probe", disable=not progress, leave=False):
            for idx in torch.randperm(n, generator=generator).to(x.device).split(batch_size):
                xb = torch.index_select(x, 0, idx, out=rows[: len(idx)])
                g = torch.softmax((weight @ xb.T).T + bias, dim=1)
                g[torch.arange(len(idx), device=x.device), y.index_select(0, idx)] -= 1.0
                g /= len(idx)
                weight.grad = g.T @ xb
                bias.grad = g.sum(0)
                opt.step()
    return weight.detach(), bias.detach()
