"""Householder parameterization of orthonormal frames, built in compact WY form.

A frame ``Q in St(n, r)`` (``Q^T Q = I_r``, ``r <= n``) is the first ``r`` columns of
``H_1 ... H_r`` with ``H_i = I - 2 y_i y_i^T / |y_i|^2`` and ``y_i`` the i-th column of a
unit lower-trapezoidal reflector matrix ``Y`` (``n x r``: ones on the diagonal, zeros
above it).

Two parameter sets describe ``Y``:

* full ``St(n, r)``: the strictly lower part of the top ``r x r`` block (``top``, packed,
  ``r(r-1)/2`` entries) and the ``(n-r) x r`` block below it (``bottom``);
  ``n r - r(r+1)/2`` free entries in all.
* reduced ``St_U(n, r)``: the top block is fixed to the identity, only ``bottom`` is
  learned; ``r(n-r)`` free entries. It removes the gauge ``U V^T = (UP)(VP)^T``. Frames
  of this set have an upper-triangular top block with diagonal in ``[-1, 1)``.

Compact WY: with ``G = Y^T Y`` and ``A = striu(G) + diag(G)/2`` (upper triangular),
``H_1 ... H_r = I - Y A^{-1} Y^T``, so ``Q = E - Y (A^{-1} Y[:r]^T)`` where ``E`` is the
first ``r`` columns of the identity. That is one Gram matrix, one triangular solve and
one matmul, batched over leading dimensions and differentiable by plain autograd.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "frame_precision",
    "stiefel_dof",
    "reflectors_from_params",
    "householder_frame",
    "sequential_householder_frame",
    "frame_params_from_frame",
    "identity_frame_params",
    "st_u_gauge",
]


def frame_precision(factor: Tensor):
    """The context a frame build runs in: autocast off (orthogonality needs full precision)
    on a device that has autocast (not ``meta``). Half-precision factors are a TypeError: the
    WY form's triangular solves have no float16 / bfloat16 kernel on CPU, and frames
    built in half precision would not stay orthonormal."""
    if factor.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"SVDP / STTP build their orthonormal frames in float32 or float64, these factors are "
                        f"{factor.dtype}: keep the parameters in float32 and compute in half precision under "
                        f"torch.autocast(device_type, dtype={factor.dtype})")
    if factor.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(factor.device.type, enabled=False)


def stiefel_dof(n: int, r: int, reduced: bool) -> int:
    """Free scalars of a frame in ``St(n, r)`` (``reduced=False``) or ``St_U(n, r)``."""
    if not 1 <= r <= n:
        raise ValueError(f"a frame needs 1 <= r <= n, got n={n}, r={r}")
    return r * (n - r) if reduced else n * r - r * (r + 1) // 2


def _top_index(r: int, device=None) -> tuple[Tensor, Tensor]:
    """Row/column indices of the strictly lower triangle of an ``r x r`` block."""
    return torch.tril_indices(r, r, offset=-1, device=device).unbind(0)


def reflectors_from_params(bottom: Tensor, top: Tensor | None) -> Tensor:
    """Unit lower-trapezoidal reflector matrix ``Y``.

    Args:
        bottom: ``(..., n - r, r)``, the block below the top ``r x r`` block.
        top: ``(..., r (r - 1) / 2)`` strictly-lower entries of the top block (row-major
            order of ``torch.tril_indices``), or ``None`` for the reduced set ``St_U``.
    Returns:
        ``Y``: ``(..., n, r)``.
    """
    r = bottom.shape[-1]
    eye = torch.eye(r, dtype=bottom.dtype, device=bottom.device)
    if top is None:
        head = eye.expand(*bottom.shape[:-2], r, r)
    else:
        rows, cols = _top_index(r, bottom.device)
        head = bottom.new_zeros(*bottom.shape[:-2], r, r)
        head = _scatter_top(head, top, rows, cols) + eye
    return torch.cat([head, bottom], dim=-2)


def _scatter_top(head: Tensor, top: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    # index_put with a leading ellipsis is not supported; flatten the r x r block instead.
    r = head.shape[-1]
    flat = head.reshape(*head.shape[:-2], r * r)
    flat = flat.index_copy(-1, rows * r + cols, top)
    return flat.reshape(head.shape)


def householder_frame(bottom: Tensor, top: Tensor | None = None) -> Tensor:
    """Orthonormal frame ``Q = (H_1 ... H_r)[:, :r]`` in compact WY form.

    Args:
        bottom: ``(..., n - r, r)``; ``top``: ``(..., r (r - 1) / 2)`` or ``None`` (St_U).
    Returns:
        ``Q``: ``(..., n, r)`` with ``Q^T Q = I_r``.
    """
    if torch._C._are_functorch_transforms_active():
        # inside torch.func's transforms: plain torch ops, which they differentiate to any
        # order and in forward mode too (the hand-derived backwards are first order only)
        return _wy_frame_by_autograd(bottom, top)
    if top is None:
        return _SquareFrame.apply(bottom) if bottom.shape[-2] == 0 else _WYFrameReduced.apply(bottom)
    return _WYFrame.apply(bottom, top)


def _wy_frame_by_autograd(bottom: Tensor, top: Tensor | None) -> Tensor:
    """The WY frame of :func:`householder_frame` by plain differentiable torch ops (same
    forward as :class:`_WYFrame`): what torch.func's grad, vmap, jacrev, jacfwd and nested
    grads (a MAML meta-gradient) differentiate, to any order. ``(..., n, r)``."""
    y = reflectors_from_params(bottom, top)
    n, r = y.shape[-2:]
    k = torch.linalg.solve_triangular(_wy_a(y.mT @ y), y[..., :r, :].mT, upper=True)
    return torch.eye(n, r, dtype=y.dtype, device=y.device) - y @ k


class _SquareFrame(torch.autograd.Function):
    """The frame of ``St_U(r, r)``: ``Y = I`` (nothing below the fixed top block), ``A = I / 2``,
    so ``Q = E - 2 I = -I`` exactly, the bits the WY build gives, with no parameter to learn.

    Such frames are common (a TT core whose left rank times mode equals its right rank: in
    resnet20_cifar at rank 32, 136 of 233 frames), and the WY kernels cost a dozen small ops
    forward and backward each. (The layers keep such an empty ``bottom`` ``(..., 0, r)`` as a
    buffer, not a parameter: :func:`sttpfast.params.base.empty_factors_as_buffers`.)
    """

    @staticmethod
    def forward(ctx, bottom):
        r = bottom.shape[-1]
        ctx.shape = bottom.shape
        eye = torch.eye(r, dtype=bottom.dtype, device=bottom.device).neg_()
        return eye.expand(*bottom.shape[:-2], r, r).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq):
        return dq.new_zeros(ctx.shape)


def _wy_a(gram: Tensor) -> Tensor:
    """``A = striu(G) + diag(G) / 2`` from the Gram matrix ``G = Y^T Y`` (``(..., r, r)``, consumed)."""
    a = torch.triu(gram)
    a.diagonal(dim1=-2, dim2=-1).mul_(0.5)
    return a


def _wy_adjoint(a: Tensor, k: Tensor, yt_dq: Tensor) -> tuple[Tensor, Tensor]:
    """``(Z, dG + dG^T)`` of the WY backward from ``Y^T dQ``: ``Z = -A^{-T} Y^T dQ`` and
    ``dG = -triu(Z K^T)`` with its diagonal halved (A reads only the upper triangle of G)."""
    z = torch.linalg.solve_triangular(a.mT, yt_dq, upper=False).neg_()
    dg = torch.triu(z @ k.mT).neg_()
    dg.diagonal(dim1=-2, dim2=-1).mul_(0.5)
    return z, dg + dg.mT


class _WYFrameReduced(torch.autograd.Function):
    """:class:`_WYFrame` on ``St_U``, where ``Y = [I; B]``: the identity block is never multiplied.

    Forward: ``G = I + B^T B``, ``A`` as in :class:`_WYFrame`, ``K = A^{-1}``, ``Q = [I - K; -B K]``.
    Backward (only ``B`` is learned): ``Y^T dQ = dQ_1 + B^T dQ_2``, ``Z``, ``dG`` and
    ``S = dG + dG^T`` as in :class:`_WYFrame`, ``dB = B S - dQ_2 K^T``. The matmuls run over
    the ``n - r`` rows of ``B`` instead of all ``n`` rows of ``Y``: half the work on the frames
    of a TT core whose rows are twice its columns, the most common shape.
    """

    @staticmethod
    def forward(ctx, bottom):
        r = bottom.shape[-1]
        gram = bottom.mT @ bottom
        gram.diagonal(dim1=-2, dim2=-1).add_(1.0)
        a = _wy_a(gram)
        eye = torch.eye(r, dtype=bottom.dtype, device=bottom.device)
        k = torch.linalg.solve_triangular(a, eye.expand_as(a), upper=True)
        q = torch.cat([eye - k, (bottom @ k).neg_()], dim=-2)
        ctx.save_for_backward(bottom, a, k)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq):
        bottom, a, k = ctx.saved_tensors
        r = bottom.shape[-1]
        dq_top, dq_bottom = dq[..., :r, :], dq[..., r:, :]
        _, sym = _wy_adjoint(a, k, dq_top + bottom.mT @ dq_bottom)
        d_bottom = bottom @ sym
        d_bottom.sub_(dq_bottom @ k.mT)
        return d_bottom


class _WYFrame(torch.autograd.Function):
    """Compact-WY frame on the full ``St`` (``top`` given; ``St_U`` is :class:`_WYFrameReduced`)
    with a hand-derived backward.

    Forward: ``G = Y^T Y``, ``A = triu(G) - diag(G)/2``, ``K = A^{-1} Y_1^T`` (``Y_1`` the
    top ``r x r`` block), ``Q = E - Y K``.
    Backward, from ``dQ``: ``dK = -Y^T dQ``, ``Z = A^{-T} dK``, ``dA = -Z K^T``,
    ``dG = triu(dA) - diag(dA)/2`` (A reads only the upper triangle of the symmetric G),
    ``dY = -dQ K^T + [Z^T; 0] + Y (dG + dG^T)``.
    Three ``n r^2`` matmuls and one small solve, against four matmuls and some twenty
    autograd nodes when autograd differentiates the forward (what dominates small frames).
    """

    @staticmethod
    def forward(ctx, bottom, top):
        y = reflectors_from_params(bottom, top)
        r = y.shape[-1]
        a = _wy_a(y.mT @ y)
        k = torch.linalg.solve_triangular(a, y[..., :r, :].mT, upper=True)
        q = torch.neg(y @ k)
        q[..., :r, :].diagonal(dim1=-2, dim2=-1).add_(1.0)
        ctx.save_for_backward(y, a, k)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq):
        y, a, k = ctx.saved_tensors
        r = y.shape[-1]
        z, sym = _wy_adjoint(a, k, y.mT @ dq)
        dy = y @ sym
        dy.sub_(dq @ k.mT)
        dy[..., :r, :] += z.mT
        d_bottom = dy[..., r:, :]
        d_top = None
        if ctx.needs_input_grad[1]:
            rows, cols = _top_index(r, dy.device)
            d_top = dy[..., :r, :].reshape(*dy.shape[:-2], r * r)[..., rows * r + cols]
        return d_bottom, d_top


def sequential_householder_frame(bottom: Tensor, top: Tensor | None = None) -> Tensor:
    """Reference: apply ``H_r``, then ... ``H_1`` to ``E`` one reflection at a time (slow)."""
    y = reflectors_from_params(bottom, top)
    n, r = y.shape[-2:]
    q = torch.eye(n, r, dtype=y.dtype, device=y.device).expand_as(y)
    for i in reversed(range(r)):
        v = y[..., :, i : i + 1]
        q = q - 2.0 * v @ (v.transpose(-1, -2) @ q) / (v * v).sum(dim=-2, keepdim=True)
    return q


def identity_frame_params(
    n: int, r: int, reduced: bool, noise: float = 5e-5, batch: tuple[int, ...] = (),
    dtype=torch.float32, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Parameters of a frame near ``-E`` (reflectors ``Y ~ E``): the paper's identity init.

    The tiny noise keeps the gradients of all reflector entries non-degenerate.
    """
    bottom = noise * torch.randn(*batch, n - r, r, dtype=dtype, generator=generator)
    top = None if reduced else noise * torch.randn(*batch, r * (r - 1) // 2, dtype=dtype, generator=generator)
    return bottom, top


def st_u_gauge(q: Tensor) -> Tensor:
    """Right-multiply ``q`` (``n x r``) by an orthogonal ``P`` so that the top block is upper
    triangular with a non-positive diagonal (the St_U form; P from an RQ decomposition)."""
    r = q.shape[-1]
    top = q[:r]
    # RQ of top: top = R P^T with R upper triangular. With J the exchange matrix,
    # QR (J top)^T = Q' R' gives top = (J R'^T J)(J Q'^T), and J R'^T J is upper triangular.
    flip = torch.flip(torch.eye(r, dtype=q.dtype, device=q.device), dims=[0])
    qq, _ = torch.linalg.qr((flip @ top).transpose(0, 1))
    p = qq @ flip  # orthogonal; top @ p is upper triangular
    q = q @ p
    sign = torch.where(torch.diagonal(q[:r]) > 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def frame_params_from_frame(
    q: Tensor, reduced: bool, flip: bool | Tensor = False, rotate: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Inverse of :func:`householder_frame` on one frame (``n x r``, orthonormal columns).

    Householder QR with unit-diagonal reflectors. A column is reachable only if its
    current diagonal entry is not ``+1`` (so a square full-St frame has a fixed
    determinant sign); entries near ``+1`` need huge reflectors. ``flip`` (a bool, or a
    ``(r,)`` bool mask of the columns that may be negated) lets a column with a positive
    diagonal entry be negated first; the caller absorbs the returned signs elsewhere.

    For ``reduced=True`` only the column space of ``q`` is kept: with ``rotate`` the frame
    is first rotated by an orthogonal ``P`` into the St_U form (upper-triangular top block,
    non-positive diagonal); the caller multiplies its partner factor by ``P``. Without
    ``rotate`` the frame must be in that form already (diagonal in ``[-1, 1)``).

    Returns:
        ``(bottom, top, signs, p)`` with ``householder_frame(bottom, top) == q @ p * signs``;
        ``p`` is ``r x r`` orthogonal (identity unless rotated), ``signs`` ``(r,)`` in ±1.
    """
    n, r = q.shape
    f64 = dict(dtype=torch.float64, device=q.device)
    work = q.to(torch.float64)
    p = torch.eye(r, **f64)
    if reduced and rotate:
        rotated = st_u_gauge(work)
        p = work.transpose(0, 1) @ rotated
        work = rotated
    allowed = torch.as_tensor(flip, device=q.device).expand(r)
    signs = torch.ones(r, **f64)
    y = torch.zeros(n, r, **f64)
    eye = torch.eye(n, **f64)
    cur = work.clone()
    for j in range(r):
        if allowed[j] and cur[j, j] > 0:
            signs[j] = -1.0
            cur[:, j] = -cur[:, j]
        denom = cur[j, j] - 1.0
        if denom.abs() < 1e-9:
            raise ValueError(
                f"frame column {j} is (numerically) +e_{j}: unit-diagonal Householder "
                "reflectors cannot reach it (a square frame of the other determinant sign?)"
            )
        v = (cur[:, j] - eye[:, j]) / denom
        v[:j] = 0.0
        v[j] = 1.0
        if reduced:
            v[j + 1 : r] = 0.0  # zero in exact arithmetic for frames in St_U form
        y[:, j] = v
        # reflect the columns still to come; v is zero above row j, so rows < j stay as they
        # are (and column j becomes e_j, never read again): (n - j) x (r - j) work, not n x r
        rest = cur[j:, j + 1:]
        rest.sub_(torch.outer(v[j:], v[j:] @ rest), alpha=2.0 / float(v[j:] @ v[j:]))
    bottom = y[r:].to(q.dtype)
    top = None
    if not reduced:
        rows, cols = _top_index(r, q.device)
        top = y[:r][rows, cols].to(q.dtype)
    return bottom, top, signs.to(q.dtype), p.to(q.dtype)
