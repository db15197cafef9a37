"""Attention in factored per-head forms (Khodak et al. 2021, "Factorized Neural Layers").

Multi-head self-attention with head ``h`` computes, for tokens ``x_i`` (rows, width ``d``),

    logits_ij = scale * x_i W_Q^h^T W_K^h x_j^T          (the query-key form  M_h = W_Q^h^T W_K^h, d x d)
    out_i     = sum_h sum_j a^h_ij x_j W_V^h^T W_O^h^T     (the output-value form N_h = W_O^h W_V^h, d_out x d)

so what the block learns are the ``2 H`` matrices ``M_h`` and ``N_h``, not the four
projections (``W_Q W_K^T`` has a gauge: ``W_Q -> G W_Q``, ``W_K -> G^-T W_K`` changes
nothing). The ``qk-ov`` form learns them factored, each of rank ``r`` per head:

    M_h = L_h R_h^T,   N_h = P_h Q_h^T,   L_h, R_h, Q_h: (d, r),  P_h: (d_out, r)

with spectral initialization from the current weights' products (``M_h = U S V^T``,
``L = U_r S_r^1/2``, ``R = V_r S_r^1/2``; the same for ``N_h``) and Frobenius decay on the
products, ``(wd / 2) sum_h (|L_h R_h^T|_F^2 + |P_h Q_h^T|_F^2)``, whose gradient is
``wd L (R^T R)``, ``wd R (L^T L)`` (:func:`attention_form_decay`).

It is put on a block's existing ``qkv`` and ``proj`` Linears as two weight
parametrizations, so timm's own attention forward (fused SDPA) runs unchanged and densify,
export, checkpoints and the compression report work as for any layer:

* ``qkv.weight`` ``(3 H hd, d)`` = ``[q rows; k rows; v rows]`` with the rows of head ``h``
  ``[L_h^T; 0]``, ``[R_h^T; 0]``, ``[Q_h^T; 0]`` (``hd - r`` zero rows: a rank-``r`` head
  is a head of width ``r``; the zero rows add nothing to the logits or the output);
* ``proj.weight`` ``(d_out, H hd)``: the columns of head ``h`` are ``[P_h, 0]``.

Biases stay plain parameters. At initialization they are moved where the factored form
keeps the function: the query bias acts only through ``x_j W_K^h^T b_q^h`` (the other
terms are constant over the keys and cancel in the softmax), so the new ``b_q`` solves
``R_h b_q = W_K^h^T b_q^h`` (exact at full rank); the key bias cancels in the softmax (set
to 0); the value bias adds ``W_O^h b_v^h`` to every output (attention rows sum to 1), so it
is folded into ``proj.bias`` (or solved for like ``b_q`` when ``proj`` has no bias). BEiT and
EVA keep these biases as ``q_bias`` / ``k_bias`` / ``v_bias`` beside a bias-free ``qkv``: they
are moved the same way.

Blocks it fits: timm's ``Attention`` (ViT, DeiT, BEiT, EVA...) and Swin's ``WindowAttention``:
a fused ``qkv`` Linear, ``num_heads``, a ``proj`` Linear, and no normalization, gate or
position rotation between the projections and the products (``qk_norm``, ``scale_norm``,
gated attention and rotary position embeddings, EVA-02's and the RoPE ViTs', are refused:
the forms are not products there; ``q-k-v`` keeps their function).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sttpfast.params.registry import METHOD_ATTR, Method, register_method

__all__ = ["QKVHeadForms", "OutHeadForm", "SplitQKV", "attention_blocks", "parameterize_attention", "split_qkv",
           "attention_form_pairs", "attention_form_decay", "attention_form_of", "ATTENTION_FORMS", "QKV_METHOD",
           "PROJ_METHOD"]

#: ``--attention`` choices -> description
ATTENTION_FORMS = {
    "qk-ov": "per-head query-key and output-value forms, factored at rank r per head",
    "q-k-v": "the fused qkv Linear as three Linears q, k, v, each parameterized on its own by --param",
}
#: the registered methods on a block's qkv and proj Linears
QKV_METHOD, PROJ_METHOD = "attn-qk-ov", "attn-qk-ov-proj"


def _heads_rank(rank) -> tuple[int, int]:
    """``(num_heads, rank per head)`` from a spec's rank (a pair), or a ValueError."""
    if (not isinstance(rank, (tuple, list)) or len(rank) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in rank)):
        raise ValueError(f"the attention forms take rank (num_heads, rank per head), got {rank!r}; "
                         "they are put on attention blocks by parameterize_attention (--attention qk-ov), "
                         "not on single layers")
    return int(rank[0]), int(rank[1])


def _pad_rows(f: Tensor, hd: int) -> Tensor:
    """``(H, d, r)`` factors -> ``(H, hd, d)``: each head's ``f_h^T`` with ``hd - r`` zero rows below."""
    return F.pad(f.transpose(1, 2), (0, 0, 0, hd - f.shape[-1]))


class QKVHeadForms(nn.Module):
    """Maps ``L, R, Q`` ``(H, d, r)`` onto a fused ``qkv`` weight ``(3 H hd, d)`` whose heads
    have query-key form ``L_h R_h^T`` and value rows ``Q_h^T`` (zero rows beyond ``r``).

    ``rank = (H, r)``; ``dof = 3 H r d``. Spectral init is done by
    :func:`parameterize_attention` (it needs ``proj`` too); on its own, ``right_inverse``
    of a qkv weight takes the SVD of each head's ``W_Q^h^T W_K^h`` and the first ``r`` value
    rows (exact on the weights this parametrization produces, and at full rank)."""

    def __init__(self, shape, rank, init: str = "spectral"):
        super().__init__()
        self.heads, self.r = _heads_rank(rank)
        out, self.d = int(shape[0]), int(shape[1])
        if out % (3 * self.heads):
            raise ValueError(f"a qkv weight of shape {tuple(shape)} is not 3 x {self.heads} heads")
        self.hd = out // (3 * self.heads)
        if self.r > self.hd:
            raise ValueError(f"rank per head {self.r} exceeds the head width {self.hd}")
        self.shape, self.requested_rank, self.rank, self.init = (out, self.d), (self.heads, self.r), self.r, init
        self.pending: tuple[Tensor, ...] | None = None  # factors set by parameterize_attention
        self.identity_on_register = False

    @staticmethod
    def count_dof(shape, transposed, rank) -> int:
        heads, r = _heads_rank(rank)
        return 3 * heads * r * int(shape[1])

    @property
    def dof(self) -> int:
        return self.count_dof(self.shape, False, self.requested_rank)

    def forward(self, left: Tensor, right: Tensor, value: Tensor) -> Tensor:
        """``(H, d, r)`` x 3 -> ``(3 H hd, d)``."""
        rows = [_pad_rows(f, self.hd).reshape(self.heads * self.hd, self.d) for f in (left, right, value)]
        return torch.cat(rows, 0)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.pending is not None:
            factors, self.pending = self.pending, None
            return factors
        if self.identity_on_register:
            self.identity_on_register = False
            eye = torch.eye(self.d, self.r, dtype=weight.dtype, device=weight.device).expand(self.heads, -1, -1)
            return tuple(eye.clone() for _ in range(3))
        q, k, v = (w.reshape(self.heads, self.hd, self.d) for w in weight.detach().chunk(3, 0))
        left, right = product_factors(q.transpose(1, 2), k, self.r)
        return left, right, v[:, : self.r].transpose(1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.hd}, rank_per_head={self.r}, dof={self.dof}"


class OutHeadForm(nn.Module):
    """Maps ``P`` ``(H, d_out, r)`` onto a ``proj`` weight ``(d_out, H hd)`` whose head ``h``
    columns are ``[P_h, 0]``: with :class:`QKVHeadForms`' value rows, ``N_h = P_h Q_h^T``.

    ``rank = (H, r)``; ``dof = H r d_out``."""

    def __init__(self, shape, rank, init: str = "spectral"):
        super().__init__()
        self.heads, self.r = _heads_rank(rank)
        self.d_out, width = int(shape[0]), int(shape[1])
        if width % self.heads:
            raise ValueError(f"a proj weight of shape {tuple(shape)} is not {self.heads} heads wide")
        self.hd = width // self.heads
        if self.r > self.hd:
            raise ValueError(f"rank per head {self.r} exceeds the head width {self.hd}")
        self.shape, self.requested_rank, self.rank, self.init = (self.d_out, width), (self.heads, self.r), self.r, init
        self.pending: tuple[Tensor, ...] | None = None
        self.identity_on_register = False

    @staticmethod
    def count_dof(shape, transposed, rank) -> int:
        heads, r = _heads_rank(rank)
        return heads * r * int(shape[0])

    @property
    def dof(self) -> int:
        return self.count_dof(self.shape, False, self.requested_rank)

    def forward(self, out_left: Tensor) -> Tensor:
        """``(H, d_out, r)`` -> ``(d_out, H hd)``."""
        cols = F.pad(out_left, (0, self.hd - self.r))  # (H, d_out, hd)
        return cols.transpose(0, 1).reshape(self.d_out, self.heads * self.hd)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor]:
        # a 1-tuple, not a tensor: the factor is then ``original0`` like every multi-factor
        # form, and parametrize never mistakes its shape for the weight's
        if self.pending is not None:
            factors, self.pending = self.pending, None
            return factors
        if self.identity_on_register:
            self.identity_on_register = False
            return (torch.eye(self.d_out, self.r, dtype=weight.dtype, device=weight.device).expand(
                self.heads, -1, -1).clone(),)
        cols = weight.detach().reshape(self.d_out, self.heads, self.hd).transpose(0, 1)
        return (cols[..., : self.r].contiguous(),)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.hd}, rank_per_head={self.r}, dof={self.dof}"


def product_factors(a: Tensor, b: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Khodak et al.'s spectral init of the product ``a @ b`` (``(H, m, k) @ (H, k, n)``):
    ``U_r S_r^1/2`` ``(H, m, r)`` and ``V_r S_r^1/2`` ``(H, n, r)``, computed in float64."""
    u, s, vh = torch.linalg.svd(a.double() @ b.double(), full_matrices=False)
    root = s[..., :r].sqrt().unsqueeze(-2)
    return ((u[..., :r] * root).to(a.dtype).contiguous(), (vh[..., :r, :].transpose(-1, -2) * root).to(a.dtype).contiguous())


for _cls, _name in ((QKVHeadForms, QKV_METHOD), (OutHeadForm, PROJ_METHOD)):
    setattr(_cls, METHOD_ATTR, _name)


def _apply(cls):
    def apply(module: nn.Module, rank, init: str) -> None:
        p = cls(tuple(module.weight.shape), rank, init)
        p.identity_on_register = init == "identity"  # a checkpoint's tensors are loaded afterwards
        parametrize.register_parametrization(module, "weight", p, unsafe=True)
    return apply


class _HeadsMethod(Method):
    """A registry entry whose rank is ``(num_heads, rank per head)`` (a JSON list in specs)."""

    def rank_to_spec(self, rank):
        return None if rank is None else list(rank)

    def rank_from_spec(self, value):
        return _heads_rank(value)


for _cls, _name in ((QKVHeadForms, QKV_METHOD), (OutHeadForm, PROJ_METHOD)):
    register_method(_HeadsMethod(name=_name, apply=_apply(_cls), count_dof=_cls.count_dof, rank_kind=tuple,
                                 penalty=None, default_init="spectral", scope="attention"))
# penalty None: the forms' Frobenius decay spans two layers (P on proj, Q on qkv), so the
# learner's AttentionFormDecay applies it, not the per-layer FrobeniusDecay


# ---------------------------------------------------------------------------------------
# blocks
def _block_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` of an attention block the forms fit, else None."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return None
    width = qkv.out_features
    if width % (3 * heads) or proj.in_features != width // 3:
        return None
    return heads, width // (3 * heads)


def _uses_rope(model: nn.Module) -> bool:
    """The model holds a rotary position embedding (timm's ``RotaryEmbedding*``: EVA-02, the
    RoPE ViTs), which it passes to its attention blocks' ``forward(x, rope=...)``."""
    return any("Rotary" in type(m).__name__ for m in model.modules())


def _refusal(name: str, module: nn.Module, rope: bool = False) -> str | None:
    """Why the block's forms are not products (a norm, gate or position rotation in between),
    or None. ``rope``: the model has rotary embeddings (:func:`_uses_rope`) that it passes to
    blocks taking a ``rope`` argument (EVA-02); SAM's blocks hold their own (``self.rope``)."""
    if getattr(module, "rope", None) is not None or (rope and "rope" in inspect.signature(type(module).forward).parameters):
        return (f"attention block {name!r} rotates q and k by position (rotary embeddings): its query-key form "
                "is not a product")
    for attr in ("q_norm", "k_norm", "norm"):
        sub = getattr(module, attr, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return f"attention block {name!r} normalizes between the projections ({attr}): its forms are not products"
    if getattr(module, "gate", None) is not None:
        return f"attention block {name!r} is gated: its output-value form is not a product"
    return None


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, block, num_heads, head_dim)`` of every block with a fused ``qkv`` Linear, a
    ``proj`` Linear and ``num_heads`` (timm's ``Attention``, Swin's ``WindowAttention``)."""
    found = []
    for name, module in model.named_modules():
        shape = _block_shape(module)
        if shape is not None:
            found.append((name, module, *shape))
    return found


def _blocks_or_refuse(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """:func:`attention_blocks`, or a ValueError saying why there are none: no attention at
    all, or attention of a kind the forms do not cover (CoAtNet's ``Attention2d``...)."""
    blocks = attention_blocks(model)
    if blocks:
        return blocks
    kinds = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
    if kinds:
        raise ValueError(f"{type(model).__name__}'s attention ({', '.join(kinds)}) is not a kind sttpfast factors: "
                         "--attention takes timm's ViT / Swin attention (a fused qkv Linear, num_heads and a proj "
                         "Linear)")
    raise ValueError(f"{type(model).__name__} has no attention blocks (a fused qkv Linear, num_heads and a "
                     "proj Linear, as timm's ViT / Swin attention); --attention applies to transformers")


def parameterize_attention(model: nn.Module, form: str = "qk-ov", rank: int | None = None) -> list[str]:
    """Put every attention block of ``model`` in ``form`` (in place).

    Args:
        form: ``qk-ov``: the factored forms of the module docstring; returns the names of
            the Linears it parameterized (``blocks.0.attn.qkv``, ``blocks.0.attn.proj``...),
            which ``parameterize`` must then leave alone. ``q-k-v``: :func:`split_qkv`
            (returns [], since ``parameterize`` is meant to treat q, k and v next).
        rank: rank per head ``r`` (capped at the head width); None: the head width (the
            forms reproduce the block's function exactly, up to float rounding).

    Raises:
        ValueError: an unknown form, a bad rank, a model without attention blocks, a block
            whose forms are not products, a block already parameterized. Nothing is changed then.
    """
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; allowed: {', '.join(ATTENTION_FORMS)}")
    if form == "q-k-v":
        return split_qkv(model)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank per head must be a positive integer, got {rank!r}")
    blocks = _blocks_or_refuse(model)
    rope = _uses_rope(model)
    for name, block, _, _ in blocks:
        reason = _refusal(name, block, rope)
        if reason is None and (parametrize.is_parametrized(block.qkv) or parametrize.is_parametrized(block.proj)):
            reason = f"attention block {name!r} is already parameterized"
        if reason is not None:
            raise ValueError(reason)
    names: list[str] = []
    for name, block, heads, hd in blocks:
        _factorize_block(block, heads, hd, hd if rank is None else min(rank, hd))
        names += [f"{name}.qkv" if name else "qkv", f"{name}.proj" if name else "proj"]
    return names


def _qkv_bias(block: nn.Module) -> Tensor | None:
    """The block's q, k, v biases as one ``(3 H hd,)`` tensor: ``qkv.bias``, or BEiT's / EVA's
    ``q_bias``, ``k_bias`` (a zero buffer, or None) and ``v_bias`` beside a bias-free qkv."""
    if block.qkv.bias is not None:
        return block.qkv.bias
    q, v = getattr(block, "q_bias", None), getattr(block, "v_bias", None)
    if q is None or v is None:
        return None
    k = getattr(block, "k_bias", None)
    return torch.cat((q, torch.zeros_like(q) if k is None else k, v))


def _set_qkv_bias(block: nn.Module, q: Tensor, v: Tensor) -> None:
    """Write the moved query and value biases (the key bias becomes 0) where the block keeps them."""
    if block.qkv.bias is not None:
        block.qkv.bias.copy_(torch.cat((q, torch.zeros_like(q), v)))
        return
    block.q_bias.copy_(q)
    block.v_bias.copy_(v)
    if getattr(block, "k_bias", None) is not None:
        block.k_bias.zero_()


@torch.no_grad()
def _factorize_block(block: nn.Module, heads: int, hd: int, r: int) -> None:
    """Spectral init from the block's products, biases moved where the forms keep the function."""
    qkv, proj = block.qkv, block.proj
    d, d_out = qkv.in_features, proj.out_features
    wq, wk, wv = (w.reshape(heads, hd, d) for w in qkv.weight.chunk(3, 0))
    wo = proj.weight.reshape(d_out, heads, hd).transpose(0, 1)  # (H, d_out, hd)
    left, right = product_factors(wq.transpose(1, 2), wk, r)      # M_h = W_Q^h^T W_K^h
    out_left, value = product_factors(wo, wv, r)                  # N_h = W_O^h W_V^h
    fused_bias = _qkv_bias(block)
    if fused_bias is not None:
        bq, bk, bv = (b.reshape(heads, hd) for b in fused_bias.chunk(3, 0))
        new_q = torch.zeros_like(bq)
        key_term = (wk.transpose(1, 2) @ bq.unsqueeze(-1)).double()  # (H, d, 1): W_K^h^T b_q^h
        new_q[:, :r] = torch.linalg.lstsq(right.double(), key_term).solution.squeeze(-1).to(bq.dtype)
        out_term = (wo @ bv.unsqueeze(-1)).squeeze(-1)  # (H, d_out): W_O^h b_v^h
        new_v = torch.zeros_like(bv)
        if proj.bias is not None:
            proj.bias.add_(out_term.sum(0))
        else:
            new_v[:, :r] = torch.linalg.lstsq(out_left.double(), out_term.double().unsqueeze(-1)
                                              ).solution.squeeze(-1).to(bv.dtype)
        _set_qkv_bias(block, new_q.reshape(-1), new_v.reshape(-1))
    p_qkv = QKVHeadForms(tuple(qkv.weight.shape), (heads, r))
    p_proj = OutHeadForm(tuple(proj.weight.shape), (heads, r))
    p_qkv.pending, p_proj.pending = (left, right, value), (out_left,)
    parametrize.register_parametrization(qkv, "weight", p_qkv, unsafe=True)
    parametrize.register_parametrization(proj, "weight", p_proj, unsafe=True)
    for layer in (qkv, proj):  # new modules start in train mode: keep the block's
        layer.parametrizations.train(layer.training)


# ---------------------------------------------------------------------------------------
# q, k and v as three matrices
class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear ``d -> 3 A`` as three Linears ``q``, ``k``, ``v`` (``d -> A``):
    ``x (..., d) -> cat(q(x), k(x), v(x)) (..., 3 A)``, the fused layer's output.

    ``parameterize`` then sees three layers, each with its own rank, spectrum and bound
    (``--include '*.qkv.v' --rank 16``...), batched by the frame bank like any equal shapes.
    The state dict keeps timm's fused layout (``qkv.weight`` ``(3 A, d)``, ``qkv.bias``) while
    the three are plain Linears, so a dense or densified model loads and saves with timm's
    own checkpoints; parameterized, each part's factors are saved under its own name."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        d, out = fused.in_features, fused.out_features
        if out % 3:
            raise ValueError(f"a fused qkv Linear needs 3 x A outputs, got {out}")
        self.in_features, self.out_features = d, out
        weights = fused.weight.detach().chunk(3, 0)
        biases = fused.bias.detach().chunk(3, 0) if fused.bias is not None else (None,) * 3
        for name, w, b in zip("qkv", weights, biases):
            part = nn.Linear(d, out // 3, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                part.weight.copy_(w)
                if b is not None:
                    part.bias.copy_(b)
            setattr(self, name, part)
        self.register_state_dict_post_hook(_fused_keys)
        self.register_load_state_dict_pre_hook(_split_keys)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((self.q(x), self.k(x), self.v(x)), -1)

    # blocks that call F.linear(x, self.qkv.weight, their own biases) (EVA, BEiT) read these:
    # the fused matrix built from the three (parameterized or not) parts, so gradients reach them
    @property
    def weight(self) -> Tensor:
        """``(3 A, d)``: ``[q.weight; k.weight; v.weight]``."""
        return torch.cat((self.q.weight, self.k.weight, self.v.weight), 0)

    @property
    def bias(self) -> Tensor | None:
        """``(3 A,)`` or None (a bias-free fused layer)."""
        if self.q.bias is None:
            return None
        return torch.cat((self.q.bias, self.k.bias, self.v.bias), 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (q, k, v)"


def _fused_keys(module: SplitQKV, state: dict, prefix: str, local_metadata) -> None:
    """Plain q, k, v: write timm's ``weight`` / ``bias`` instead of ``q.weight``..."""
    parts = (module.q, module.k, module.v)
    if any(parametrize.is_parametrized(p) for p in parts):
        return
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{n}.{kind}" for n in "qkv"]
        if all(k in state for k in keys):
            state[f"{prefix}{kind}"] = torch.cat([state.pop(k) for k in keys], 0)


def _split_keys(module: SplitQKV, state: dict, prefix: str, *args) -> None:
    """timm's fused ``weight`` / ``bias`` -> ``q.weight``... (a dense or densified checkpoint)."""
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}{kind}", None)
        if fused is not None:
            for n, chunk in zip("qkv", fused.chunk(3, 0)):
                state[f"{prefix}{n}.{kind}"] = chunk


def split_qkv(model: nn.Module) -> list[str]:
    """Replace the fused ``qkv`` Linear of every attention block by :class:`SplitQKV` (in
    place; same function, same state dict). Returns []: nothing is parameterized yet.

    Raises:
        ValueError: no attention block, or a block whose qkv is already parameterized."""
    blocks = _blocks_or_refuse(model)
    for name, block, _, _ in blocks:
        if parametrize.is_parametrized(block.qkv):
            raise ValueError(f"attention block {name!r} is already parameterized; split q, k, v first")
    for _, block, _, _ in blocks:
        block.qkv = SplitQKV(block.qkv).train(block.qkv.training)  # new modules start in train mode
    return []


def attention_form_of(model: nn.Module) -> str | None:
    """The form :func:`parameterize_attention` put ``model``'s attention in: ``q-k-v`` (it holds
    a :class:`SplitQKV`), ``qk-ov`` (a layer holds the forms), or None (neither).

    A checkpoint records it: the split is a change of modules, not a parametrization, so the
    parameterization spec cannot say it, and a model rebuilt from timm has no ``qkv.v``."""
    for module in model.modules():
        if isinstance(module, SplitQKV):
            return "q-k-v"
        if (parametrize.is_parametrized(module, "weight")
                and getattr(module.parametrizations.weight[0], METHOD_ATTR, None) == QKV_METHOD):
            return "qk-ov"
    return None


# ---------------------------------------------------------------------------------------
# Frobenius decay on the products
def attention_form_pairs(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(U, V)`` factor pairs ``(H, m, r)``, ``(H, n, r)`` of every factored form
    ``U V^T``: ``(L, R)`` (query-key) and ``(P, Q)`` (output-value) of each block."""
    pairs = []
    for _, block, _, _ in attention_blocks(model):
        if not (parametrize.is_parametrized(block.qkv) and parametrize.is_parametrized(block.proj)):
            continue
        plist_qkv, plist_proj = block.qkv.parametrizations.weight, block.proj.parametrizations.weight
        if getattr(plist_qkv[0], METHOD_ATTR, None) != QKV_METHOD:
            continue
        left, right, value = plist_qkv.original0, plist_qkv.original1, plist_qkv.original2
        pairs += [(left, right), (plist_proj.original0, value)]
    return pairs


def attention_form_penalty(model: nn.Module, wd: float) -> Tensor:
    """``(wd / 2) sum |U V^T|_F^2`` over every factored form (for tests and logging; training
    adds its gradient with :func:`attention_form_decay`, never forming ``U V^T``)."""
    total = torch.zeros(())
    for u, v in attention_form_pairs(model):
        total = total + 0.5 * wd * (u @ v.transpose(-1, -2)).square().sum()
    return total


@torch.no_grad()
def attention_form_decay(model: nn.Module, wd: float) -> None:
    """Add the gradient of :func:`attention_form_penalty` to the factors' ``.grad``:
    ``U += wd U (V^T V)``, ``V += wd V (U^T U)`` per head (``r x r`` Grams only)."""
    if wd == 0:
        return
    for u, v in attention_form_pairs(model):
        gu, gv = wd * (u @ (v.transpose(-1, -2) @ v)), wd * (v @ (u.transpose(-1, -2) @ u))
        for t, g in ((u, gu), (v, gv)):
            if t.grad is None:
                t.grad = g
            else:
                t.grad.add_(g)
