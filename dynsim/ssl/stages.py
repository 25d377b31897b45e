"""Plastic units, encoder stages and projection heads for the SSL pipelines.

A *unit* is one weight matrix with an explicit feedback path: the forward pass uses ``W``,
the error travelling down uses ``B`` (``feedback``), and the weight update is written out
as pre-activity x post-error (:meth:`Conv3x3.weight_grad`, :meth:`Dense.weight_grad`).
With ``feedback is None`` the error goes down through ``W`` itself (backpropagation).
``B`` is stored in ``W``'s layout; the transpose is applied by the backward operation, so
"B = W" in this layout means "feedback = Wᵀ" in the usual notation.

A *stage* is one unit, an optional activation and zero or more 2x2 max-pools; a *head* is
avg-pool -> flatten -> linear 64 without bias. :func:`build_encoder` makes an
:class:`Encoder` from a spec string such as ``"c32-a-c32-p-c64-a-c64-p-c512-p"`` (``a``: an
activation after the layer before it, where Tang, Yang & Amit put theirs; a spec without any
``a`` puts the activation after every layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from dynsim.errors import ConfigError

ARCHS: dict[str, str] = {
    "cifar": "c32-a-c32-p-c64-a-c64-p-c512-p",
    "cifar-half": "c16-a-c16-p-c32-a-c32-p-c256-p",
    "vgg6": "c128-p-c256-p-c256-c512-p-c1024-p-c1024-p",
    "small": "c32-p-c64-p-c128-p",
    "tiny": "c16-c32-p-c64-p",
}
"""Named encoders. ``cifar`` is the CIFAR encoder of Tang et al. (2022) with the activations
where their parameter file has them (after the first conv of each of the first two blocks;
none after ``conv1a``, ``conv2a``, ``conv3``: ``pars_emb_cifar.txt`` in their code);
``cifar-half`` the same at half the widths (the default for 28x28 grey images: a quarter of
``cifar``'s multiply-adds per image); ``vgg6`` the STL-10 net (six 3x3 conv layers, the
activation after each; pool positions are our choice, 64x64 -> 2x2);
``small`` the earlier 28x28 default (an activation after every conv); ``tiny`` the default for
8x8 digits."""


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


ACTIVATIONS = {"relu": F.relu, "hardtanh": F.hardtanh, "linear": _identity}
"""Stage nonlinearities; ``linear`` (identity) is for tests and analysis."""


def conv_transpose_input(weight: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The error below a 3x3, stride-1, padding-1 convolution: ``dL/dx = conv(dL/dy, W̃)``.

    ``W̃[i, o, u, v] = W[o, i, 2 − u, 2 − v]`` (channels swapped, kernel flipped): the adjoint
    of the convolution is the convolution with the flipped, transposed kernel: the same
    numbers as :func:`torch.nn.grad.conv2d_input`, computed by oneDNN's forward kernel (in the
    whole training step ``benchmarks/ssl_step.py`` measured no speed difference beyond its noise).
    """
    return F.conv2d(grad_out, weight.flip(2, 3).transpose(0, 1), padding=1)


class _FeedbackConv2d(torch.autograd.Function):
    """y = conv3x3(x, W); backward sends the error down through ``B`` instead of ``W``."""

    @staticmethod
    def forward(ctx, x, weight, feedback):  # noqa: D102
        ctx.save_for_backward(feedback)
        ctx.x_shape = x.shape
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (feedback,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_transpose_input(feedback, grad_out)
        return grad_x, None, None


class _FeedbackLinear(torch.autograd.Function):
    """y = x Wᵀ; backward gives e B (B in W's layout, so B = W is backprop)."""

    @staticmethod
    def forward(ctx, x, weight, feedback):  # noqa: D102
        ctx.save_for_backward(feedback)
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (feedback,) = ctx.saved_tensors
        grad_x = grad_out @ feedback if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class _Unit(nn.Module):
    """One weight ``W`` and an optional feedback ``B`` (same layout as ``W``)."""

    weight: nn.Parameter
    feedback: torch.Tensor | None

    def make_feedback(self, generator: torch.Generator | None = None) -> None:
        """Give the unit an independent random feedback ``B`` with ``W``'s init law."""
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        b = torch.rand(self.weight.shape, generator=generator, dtype=self.weight.dtype)
        self.feedback = ((2 * b - 1) * bound).to(self.weight.device)

    def _feedback(self) -> torch.Tensor:
        return self.weight.detach() if self.feedback is None else self.feedback


class Conv3x3(_Unit):
    """3x3 convolution, stride 1, padding 1, no bias: ``a = W * x``.

    Parameters
    ----------
    c_in, c_out : channels in and out. ``weight`` has shape (c_out, c_in, 3, 3).
    """

    def __init__(self, c_in: int, c_out: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(9 * c_in)
        w = torch.rand(c_out, c_in, 3, 3, generator=generator)
        self.weight = nn.Parameter((2 * w - 1) * bound)
        self.register_buffer("feedback", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H, W)."""
        return _FeedbackConv2d.apply(x, self.weight, self._feedback())

    def weight_grad(self, pre: torch.Tensor, post_err: torch.Tensor) -> torch.Tensor:
        """Local update direction ``ΔW[o,i,u,v] = Σ_b,p post_err[b,o,p] pre[b,i,p+(u,v)]``.

        The correlation of the pre-synaptic activity (B, c_in, H, W) with the post-synaptic
        error (B, c_out, H, W); it equals dL/dW when ``post_err`` is dL/da.
        """
        return conv2d_weight(pre, self.weight.shape, post_err, padding=1)


class Dense(_Unit):
    """Linear map without bias: ``a = x Wᵀ`` with ``weight`` of shape (n_out, n_in)."""

    def __init__(self, n_in: int, n_out: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        w = torch.rand(n_out, n_in, generator=generator)
        self.weight = nn.Parameter((2 * w - 1) * bound)
        self.register_buffer("feedback", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_in) -> (B, n_out)."""
        return _FeedbackLinear.apply(x, self.weight, self._feedback())

    def weight_grad(self, pre: torch.Tensor, post_err: torch.Tensor) -> torch.Tensor:
        """Local update direction ``ΔW = post_errᵀ pre``: (n_out, B) @ (B, n_in)."""
        return post_err.T @ pre


class Stage(nn.Module):
    """One hidden layer: ``a = unit(x)``, ``h = maxpool^k(act(a))``.

    A dense stage flattens its input first. :meth:`forward` returns both ``a`` (the
    unit's output, where the post-synaptic error lives) and ``h`` (the stage output).
    """

    def __init__(self, unit: Conv3x3 | Dense, act: str, pools: int):
        super().__init__()
        self.unit = unit
        self.act_name = act
        self.pools = pools

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's input: ``x`` itself, flattened for a dense stage."""
        return x.flatten(1) if isinstance(self.unit, Dense) else x

    def post(self, a: torch.Tensor) -> torch.Tensor:
        """Activation then ``pools`` 2x2 max-pools."""
        h = ACTIVATIONS[self.act_name](a)
        for _ in range(self.pools):
            h = F.max_pool2d(h, 2)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> (a, h)."""
        a = self.unit(self.pre(x))
        return a, self.post(a)


class Head(nn.Module):
    """Projection head: adaptive avg-pool to ``pool x pool`` -> flatten -> Dense(dim).

    For a dense stage output (B, N) the pooling is skipped.
    """

    def __init__(self, in_shape: tuple[int, ...], dim: int, pool: int, generator=None):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.pool = pool
        n_in = in_shape[0] * min(pool, in_shape[1]) ** 2 if len(in_shape) == 3 else in_shape[0]
        self.unit = Dense(n_in, dim, generator)

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """Stage output -> the head unit's input (B, n_in)."""
        if h.dim() == 4:
            h = F.adaptive_avg_pool2d(h, min(self.pool, h.shape[-1]))
        return h.flatten(1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> embedding for the loss (B, dim)."""
        return self.unit(self.pre(h))


class Encoder(nn.Module):
    """A stack of :class:`Stage` s with one :class:`Head` per stage.

    The representation used for evaluation is the flattened output of the last stage
    (:meth:`embed`); the heads only carry the loss.
    """

    def __init__(self, stages: list[Stage], heads: list[Head], spec: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.spec = spec

    def units(self) -> dict[str, Conv3x3 | Dense]:
        """All plastic units by name: ``s<l>`` for stage l, ``h<l>`` for head l."""
        out: dict[str, Conv3x3 | Dense] = {}
        for i, (s, h) in enumerate(zip(self.stages, self.heads, strict=True)):
            out[f"s{i}"] = s.unit
            out[f"h{i}"] = h.unit
        return out

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Images (N, C, H, W) -> representations (N, D), in chunks of ``batch_size``."""
        out = []
        for chunk in x.split(batch_size):
            h = chunk.contiguous(memory_format=torch.channels_last) if chunk.dim() == 4 else chunk
            for s in self.stages:
                h = s(h)[1]
            out.append(h.flatten(1).contiguous())
        return torch.cat(out)


def parse_spec(spec: str) -> list[tuple[str, int, int]]:
    """``"c32-c32-p-d128"`` -> ``[("c", 32, 0), ("c", 32, 1), ("d", 128, 0)]``.

    Each entry is (kind, width, number of 2x2 max-pools after the layer); ``a`` tokens
    (activations, :func:`spec_activations`) are skipped here.
    """
    spec = ARCHS.get(spec, spec)
    layers: list[tuple[str, int, int]] = []
    for tok in spec.split("-"):
        if tok == "a":
            if not layers:
                raise ConfigError(f"arch {spec!r} starts with an activation; put 'a' after a layer")
            continue
        if tok == "p":
            if not layers:
                raise ConfigError(f"arch {spec!r} starts with a pool; put 'p' after a layer")
            kind, width, pools = layers[-1]
            layers[-1] = (kind, width, pools + 1)
        elif tok[:1] in ("c", "d") and tok[1:].isdigit() and int(tok[1:]) > 0:
            layers.append((tok[0], int(tok[1:]), 0))
        else:
            raise ConfigError(
                f"arch token {tok!r} in {spec!r} is unknown; use cN (conv 3x3, N channels), "
                f"dN (dense, N units), p (2x2 max-pool), a (activation after the layer before), "
                f"or a name in {sorted(ARCHS)}"
            )
    if not layers:
        raise ConfigError(f"arch {spec!r} has no layers")
    return layers


def spec_activations(spec: str) -> list[bool]:
    """Whether each layer of ``spec`` is followed by the activation.

    ``"c32-a-c32-p"`` -> ``[True, False]`` (an ``a`` token marks the layer before it); a spec
    with no ``a`` token at all has the activation after every layer (``"c32-p-c64"`` ->
    ``[True, True]``).

    >>> spec_activations("cifar")
    [True, False, True, False, False]
    """
    spec = ARCHS.get(spec, spec)
    tokens = spec.split("-")
    if "a" not in tokens:
        return [True] * len(parse_spec(spec))
    acts: list[bool] = []
    for tok in tokens:
        if tok == "a":
            acts[-1] = True
        elif tok != "p":
            acts.append(False)
    return acts


def build_encoder(
    spec: str,
    image_shape: tuple[int, int, int],
    *,
    act: str = "hardtanh",
    head_dim: int = 64,
    head_pool: int = 2,
    generator: torch.Generator | None = None,
) -> Encoder:
    """Build an :class:`Encoder` from a spec string or a name in :data:`ARCHS`.

    Parameters
    ----------
    spec : e.g. ``"c32-a-p-c64-p"``; ``cN`` conv 3x3 (no bias), ``dN`` dense, ``p`` max-pool,
        ``a`` the activation after the layer before it (no ``a`` at all: after every layer).
    image_shape : (C, H, W) of the input images.
    act : ``"hardtanh"`` (Tang et al.'s, in [−1, 1]), ``"relu"`` or ``"linear"``.
    head_dim, head_pool : the heads are avg-pool to head_pool x head_pool -> linear head_dim.

    Examples
    --------
    >>> enc = build_encoder("c8-p-c16-p", (1, 8, 8))
    >>> enc.embed(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 64])
    """
    if act not in ACTIVATIONS:
        raise ConfigError(f"act {act!r} is unknown; use one of {sorted(ACTIVATIONS)}")
    shape: tuple[int, ...] = tuple(image_shape)
    stages, heads = [], []
    for (kind, width, pools), has_act in zip(parse_spec(spec), spec_activations(spec), strict=True):
        if kind == "c":
            if len(shape) != 3:
                raise ConfigError(f"arch {spec!r}: a conv layer cannot follow a dense layer")
            if shape[1] < 2**pools or shape[2] < 2**pools:
                raise ConfigError(f"arch {spec!r} pools a {shape[1]}x{shape[2]} map below 1x1")
            unit: Conv3x3 | Dense = Conv3x3(shape[0], width, generator)
            shape = (width, shape[1] // 2**pools, shape[2] // 2**pools)
        else:
            if pools:
                raise ConfigError(f"arch {spec!r}: a dense layer cannot be pooled")
            unit = Dense(math.prod(shape), width, generator)
            shape = (width,)
        stages.append(Stage(unit, act if has_act else "linear", pools))
        heads.append(Head(shape, head_dim, head_pool, generator))
    return Encoder(stages, heads, ARCHS.get(spec, spec))
