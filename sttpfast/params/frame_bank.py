"""Batching the weights of many spectral-chain layers: few large calls instead of many tiny ones.

A spectral chain layer builds a dozen or more small Householder frames and contracts
them; a model does that hundreds of times per step, and on a CPU each tiny op costs
mostly fixed overhead. The bank builds the weights of many layers together:

1. frames of equal shape (they recur across layers) are stacked and built in one batched
   :func:`~sttpfast.linalg.householder.householder_frame` call per shape;
2. layers of equal layout (shape, rank, variant) are contracted together: their frames
   are contiguous blocks of the shape groups (the stacking order makes sure), so the
   chain contraction runs once per layout, batched, on first request of each form:

   * the weight: the order of fewest FLOPs (:func:`~sttpfast.params.chain.root_operands`)
     up to the last matmul, which makes each layer's weight on its own when it asks;
   * the factors ``(U diag(g s), V^T)`` of a layer that runs factorized
     (:mod:`sttpfast.params.factorized`; :func:`~sttpfast.params.chain.factor_operands`):
     such a layer never pays the final ``d_out x d_in`` product.

   Which layers share a layout and which frames share a WY call depends on the layouts and
   the factors' dtype and device only: the bank works it out once per member list
   (:class:`BuildPlan`) and a build per step does the tensor work alone.

   A member the pass never hands a weight (a layer no forward used: another head) gets no
   gradient, None as without the bank, rather than the zeros a batched backward would write
   (:class:`_StackOfUsed`): optimizers then leave it alone.

   A layout's members usually take the same path (same shape, same input size); when they
   do not, both forms are contracted for the whole layout, so what a layer gets does not
   depend on which layer asked first (the bits stay those of the same batched calls).

Ownership (DESIGN.md, "the batched weight build"). One bank belongs to one parameterized
tree (the module ``parameterize`` was called on): two trees parameterized separately (a
GAN's G and D) have separate banks, and ``copy.deepcopy`` copies the bank with the tree
(the hooks are bound methods of per-module scopes, which deepcopy duplicates together with
the modules they point to). Every module of the tree that holds two or more chain layers
gets a :class:`_Scope`: forward pre/post hooks that open and close a pass over the layers
under that module. The outermost scope whose forward is running builds the weights of its
own layers only, on first use; nested scopes join its pass; ``always_call`` post hooks
close it even when forward raises. So a forward of the whole model, of one block, or of
the model under a DDP / accelerate wrapper (which calls the model's forward) is batched;
a layer that asks with autograd on for a build made under ``no_grad`` earlier in the pass (a
frozen part of the forward) gets a new build of the same members, so it still trains;
and a layer called outside any scope (or outside a forward: a callback reading one
layer's weight) joins a *loose pass* (below), never a stale one.

Traced copies (torch.fx ``symbolic_trace``, timm's ``create_feature_extractor`` and
``features_only`` through fx, ``torch.export``) call the leaf layers only, never the
containers whose hooks open a pass, and torch offers no hook on the making of such a copy
to re-install the scopes. Building each layer on its own there is not an option if the copy
is to equal the model bit for bit: a batched matmul on the CPU rounds a batch element
differently from a 2-D matmul, and even by its position in the batch (measured: 9x9
frames), so only the very same batched build, same members in the same order, gives the
same bits. So a layer used outside any scope opens a loose pass: the outermost scope's
build, exactly as the model's own forward makes it, whose weights are handed out once
each. A loose pass is never stale: it ends when a layer is used a second time (the next
forward of the copy), when the layer's factors changed since the build (an optimizer step,
``load_state_dict``), when grad mode differs from the build's, when a backward has run
through any weight it handed out (the shared build graph is freed then), and when a
scoped pass opens; weights not handed out are dropped then.

The root's ``forward_features``, ``forward_intermediates`` and ``forward_head`` (timm's
contract; they run parts of its forward without calling it) are passes of the root's scope
too (:class:`_ScopedMethod` on the root instance), so their outputs, and the feature maps of
a ``features_only`` wrapper, carry the bits of the model's own forward.

Sharded models (FSDP2, ``fully_shard`` on blocks and the root). A unit's parameters are
gathered only while that unit's forward runs, so a pass never builds everything at its
first use: a miss builds the layers of the scope whose parameters are gathered at that
moment (plain tensors, not sharded DTensors) and not built yet in this pass. Unsharded,
that is every layer at once, as before; sharded, it is one batched build per FSDP unit,
run inside the unit's forward, and a layer whose parameters are sharded when it is used
builds its own weight. Which one happened is logged once per bank.

Switching it off (``parameterize(..., frame_bank=False)`` or :func:`detach_frame_bank`) gives
per-layer builds: the reference the tests compare against.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from sttpfast.linalg.householder import frame_precision, householder_frame
from sttpfast.params.layers import factors_of, parameterized_layers

__all__ = ["BuildPlan", "FrameBank", "attach_frame_bank", "detach_frame_bank", "frame_bank_of"]

_ATTR = "_sttpfast_frame_bank"
_log = logging.getLogger(__name__)


class _Scope:
    """The chain layers under one module, and the hooks that open / close a pass over them."""

    def __init__(self, bank: "FrameBank", module: nn.Module, members: list[tuple[nn.Module, nn.Module]]):
        self.bank, self.members = bank, members
        self.handles = [module.register_forward_pre_hook(self.before_forward),
                        module.register_forward_hook(self.after_forward, always_call=True)]

    def before_forward(self, module, args):
        self.bank._open(self)

    def after_forward(self, module, args, output):
        self.bank._close()


# the root's methods that run a part of its forward (timm's contract): each is a pass of the
# root's scope, so its outputs carry the bits of the model's own forward
ROOT_METHODS = ("forward_features", "forward_intermediates", "forward_head")


class _ScopedMethod:
    """``module.<name>(...)`` run as a pass of ``scope`` (the root's): installed on the root
    instance, removed with the bank. A class, not a closure, so ``copy.deepcopy`` points the
    copy's method at the copy's scope and module."""

    def __init__(self, scope: _Scope, module: nn.Module, name: str):
        self.scope, self.module, self.name = scope, module, name

    def __call__(self, *args, **kwargs):
        self.scope.bank._open(self.scope)
        try:
            return getattr(type(self.module), self.name)(self.module, *args, **kwargs)
        finally:
            self.scope.bank._close()


class FrameBank:
    """Weights of the spectral-chain layers of one parameterized tree, computed together."""

    def __init__(self, members: list[tuple[nn.Module, nn.Module]]):
        self.members = members  # (layer, its SpectralChain parametrization), all of the tree
        self._member_of = {id(p): (layer, p) for layer, p in members}
        self.scopes: list[_Scope] = []
        self._depth = 0
        self._scope: _Scope | None = None
        self._weights: dict[int, BatchedBuild] | None = None  # the scoped pass's builds, by layer
        self._said_sharded = False  # the FSDP2 note is logged once per bank
        self._loose: dict[int, BatchedBuild] = {}  # the loose pass: layers not handed out yet
        self._loose_state: tuple = ()  # (grad mode, {id: factor snapshots}, [spent]) of its build
        self._plans: dict = {}  # BuildPlan per member list (ids), reused while it matches

    def __getstate__(self):
        # deepcopy / pickle: a loose pass's weights are non-leaf tensors (not copyable) and
        # belong to the original's graph; the copy starts without one
        state = dict(self.__dict__)
        state["_loose"], state["_loose_state"] = {}, ()
        state["_plans"] = {}  # keyed by the original's ids: the copy makes its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._member_of = {id(p): (layer, p) for layer, p in self.members}  # the copy's ids

    # -- passes -------------------------------------------------------------------------
    def _open(self, scope: _Scope) -> None:
        if self._depth == 0:
            self._scope, self._weights = scope, None
            if scope is self.scopes[0]:  # the whole tree's pass: a loose one is done with
                self._loose, self._loose_state = {}, ()
        self._depth += 1

    def _close(self) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._scope, self._weights = None, None

    @property
    def active(self) -> bool:
        return self._depth > 0

    # -- weights ------------------------------------------------------------------------
    def weight(self, parametrization: nn.Module) -> Tensor | None:
        """``parametrization``'s weight matrix ``(d_out, d_in)`` from the pass's batched build
        (see :meth:`build_of`), or None (the layer then builds its own weight)."""
        return self._hand_out(parametrization, "weight")

    def factors(self, parametrization: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(U diag(g s) (d_out, r), V^T (r, d_in))`` of ``parametrization`` from the pass's
        batched build, without the final product; None where :meth:`weight` would be."""
        return self._hand_out(parametrization, "factors")

    def _hand_out(self, parametrization: nn.Module, form: str):
        with _own_saved_tensors():
            build = self.build_of(parametrization)
            if build is None:
                return None
            # one hand-out per layer call: enter autocast(enabled=False) only where autocast is on
            kind = build.device.type
            off = torch.autocast(kind, enabled=False) if kind != "meta" and torch.is_autocast_enabled(kind) \
                else contextlib.nullcontext()
            with off, _label("sttpfast.weight_build"):
                return build.weight(id(parametrization)) if form == "weight" else build.factors(id(parametrization))

    def build_of(self, parametrization: nn.Module) -> "BatchedBuild | None":
        """The batched build that holds ``parametrization``, or None outside a pass of its
        scope or while its own parameters are sharded (the layer then builds its own weight).

        A miss builds, together, every layer of the scope not built yet in this pass whose
        parameters are gathered now. Unsharded, that is the whole scope at its first use (one
        build per pass). Under FSDP2 (``fully_shard``) a unit's parameters are gathered only
        while its forward runs, so each unit's first layer builds that unit's layers: one
        batched build per FSDP unit, never mixing gathered tensors with sharded DTensors."""
        if self._scope is None:
            return self._loose_weight(parametrization)
        if self._weights is None:
            self._weights = {}
        key = id(parametrization)
        if key not in self._weights:
            members = [m for m in _live(self._scope.members) if id(m[1]) not in self._weights]
            sharded = _sharded_members(members)
            if sharded:
                self._say_sharded(len(sharded), len(members))
                members = [m for m in members if id(m[1]) not in sharded]
            if not any(id(p) == key for _, p in members):
                return None  # this layer's parameters are sharded right now: it builds its own
            build = self._build(members)
            self._weights.update(dict.fromkeys(build.ids, build))
        build = self._weights.get(key)
        if build is not None and torch.is_grad_enabled() and not build.grad_enabled:
            # built under no_grad earlier in this pass (a frozen part of the forward): a layer
            # asking with autograd on gets the same members' build again, with gradients
            build = self._build([self._member_of[i] for i in build.ids])
            self._weights.update(dict.fromkeys(build.ids, build))
        return build

    def _build(self, members: list[tuple[nn.Module, nn.Module]]) -> "BatchedBuild":
        """The batched build of ``members``, in full precision (orthogonality needs it: never
        under bf16/fp16 autocast), labelled so that a profile tells it from the layers' work."""
        # traced by torch.compile: no plan cache (filled there, it was a guard that failed at
        # the next call: one more compile); the graph holds the plan anyway
        plans = None if torch.compiler.is_compiling() else self._plans
        with frame_precision(factors_of(members[0][0])[0]), _label("sttpfast.weight_build"):
            return build_weights(members, plans)

    def _loose_weight(self, parametrization: nn.Module) -> "BatchedBuild | None":
        """The loose pass's build (module docstring) for ``parametrization``'s one hand-out,
        opening a new pass when it has none for this layer or it went stale; None when the
        tree's layers are sharded (FSDP2: the layer builds its own)."""
        key = id(parametrization)
        if key not in self._loose or not self._loose_fresh(key):
            self._loose, self._loose_state = {}, ()
            members = _live(self.scopes[0].members)  # the outermost scope: the root's, all layers, in order
            if _sharded_members(members):
                return None
            build = self._build(members)
            spent = [False]

            def watch(tensor: Tensor) -> None:  # a backward through it frees the shared build graph
                if tensor.grad_fn is not None:
                    tensor.grad_fn.register_hook(lambda *_: spent.__setitem__(0, True))
            build.on_hand_out = watch
            self._loose = dict.fromkeys(build.ids, build)
            self._loose_state = (torch.is_grad_enabled(), {id(p): _snapshot(m, p) for m, p in members}, spent)
        return self._loose.pop(key)  # handed out once: a second use opens a new pass

    def _loose_fresh(self, key: int) -> bool:
        grad_mode, snapshots, spent = self._loose_state
        return grad_mode == torch.is_grad_enabled() and not spent[0] and _unchanged(snapshots[key], self._member_of[key])

    def _say_sharded(self, n_sharded: int, n_members: int) -> None:
        if self._said_sharded:
            return
        self._said_sharded = True
        _log.info("frame bank: the model is sharded (FSDP2): %d of %d layers are not gathered at this "
                  "module's forward; each FSDP unit builds its own layers, batched, when its forward "
                  "gathers them (a layer used while sharded builds its weight on its own)", n_sharded, n_members)


def _pack(tensor: Tensor) -> Tensor:
    # detached: a pack hook that returns the tensor itself makes a reference cycle (an op that
    # saves its output) the garbage collector cannot free, and the recomputed build's graph is
    # never run backward to break it (42 tensors leaked per step on resnet18)
    return tensor.detach()


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


#: the active saved-tensor hooks (None when none); a private torch function, looked up once
#: (without it the scope is always entered: correct, a little slower)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _own_saved_tensors():
    """Keep the build's saved tensors under identity saved-tensor hooks when other hooks are
    active: gradient checkpointing (timm's ``set_grad_checkpointing``) recomputes a block in
    the backward pass and checks that it saves tensors of the forward's shapes, but the
    bank's build runs at other places in the two (the whole tree's build in the forward, the
    block's own in the recomputation). With its saved tensors kept out of the checkpoint's,
    both save the layers' tensors alone (a weight's shape is the same either way)."""
    if torch.compiler.is_compiling() or (_TOP_HOOKS is not None and _TOP_HOOKS(False) is None):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def _label(name: str):
    """``record_function(name)`` while a profiler runs (what tells a profile the weight build
    from the layers' own work), else nothing: a hand-out happens per layer call, and the label
    costs ~15 us even with no profiler. torch keeps the flag private (2.14); without it, always label.
    Never under torch.compile, which drops the label with a warning."""
    profiling = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
    return record_function(name) if profiling and not torch.compiler.is_compiling() else contextlib.nullcontext()


def _sharded_members(members: list[tuple[nn.Module, nn.Module]]) -> set[int]:
    """ids of the parametrizations among ``members`` whose factors are sharded DTensors now."""
    # DTensors exist only once torch.distributed.tensor is imported: otherwise nothing is
    # sharded, and the single-process path pays one dictionary lookup
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return set()
    return {id(p) for layer, p in members if isinstance(_first_factor(layer), dtensor.DTensor)}


def _live(members: list[tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module]]:
    """The members still parameterized as when the bank was made: a layer made dense again
    (``densify`` of a sub-module, torch's ``remove_parametrizations``) drops out. Read from the
    modules' dicts: this runs at every build."""
    def live(layer: nn.Module, p: nn.Module) -> bool:
        plist = layer._modules.get("parametrizations")
        weight = plist._modules.get("weight") if plist is not None else None
        return weight is not None and weight._modules.get("0") is p
    kept = [m for m in members if live(*m)]
    return members if len(kept) == len(members) else kept


def _weight_inputs(layer: nn.Module, parametrization: nn.Module) -> list[Tensor]:
    """The tensors the layer's weight is built from: its factors and gain."""
    return list(factors_of(layer)) + [parametrization.gain]


def _snapshot(layer: nn.Module, parametrization: nn.Module) -> tuple:
    """The layer's weight inputs as ``(tensor, copy of its values)`` pairs at a build."""
    return tuple((t, t.detach().clone()) for t in _weight_inputs(layer, parametrization))


def _unchanged(snapshot: tuple, member: tuple[nn.Module, nn.Module]) -> bool:
    """Whether the layer's weight inputs are the tensors and values of ``snapshot``. Values,
    not version counters: an update through ``.data`` (fastai's optimizers step so) leaves
    the counter alone. The copies cost the size of the factors, a fraction of the weights."""
    current = _weight_inputs(*member)
    return len(current) == len(snapshot) and all(
        t is old and torch.equal(t.detach(), values) for t, (old, values) in zip(current, snapshot))


def _first_factor(layer: nn.Module) -> Tensor | None:
    """The layer's first non-empty factor. A unit gathers or shards all of a layer's factors
    together (empty ones are never sharded: see sttpfast.fsdp), so one tells for all. Read
    from the modules' dicts, where FSDP2 puts the gathered or sharded tensor: factors_of's
    attribute lookups cost ~40 us per layer, paid at every pass."""
    plist = layer._modules["parametrizations"]._modules["weight"]
    return next((t for t in plist._parameters.values() if t is not None and t.numel()), None)


class BuildPlan:
    """What a batched build of one member list does with the members' factors, worked out once:
    which layers share a layout, which frames share a WY call, where each frame's factors sit
    in its layer's flat factor tuple. It depends on the layouts (fixed per parametrization),
    and on the factors' dtype and device (:meth:`matches`), never on their values, so a bank
    keeps one per member list and a build per step pays only the tensor work and a lookup.

    Attributes:
        layouts: ``{layout key: [member index]}``, a layout key being ``(ChainLayout, dtype,
            device)``; members in member order.
        slots: ``[(layout key, index in its layout)]`` per member.
        indices: per member, its :class:`~sttpfast.params.chain.ChainFactors` of flat indices
            (where the spectrum and each core's bottom and top sit in its factor tuple).
        frame_calls: one entry per WY call: ``[(frame key, [(member, bottom index, top index
            or None)])]``, frame keys of ascending rows (the call pads to the last one's).
        blocks: ``{frame key: [frames per (layout, core) block]}``, in stacking order.
        where: ``{(layout key, core index): (frame key, block index)}``.
    """

    def __init__(self, members: list[tuple[nn.Module, nn.Module]], flats: list[tuple[Tensor, ...]]):
        from sttpfast.params.chain import ChainFactors

        self.layout_of = [p.layout for _, p in members]  # held: the identity check of matches()
        # per member, the flat index of its spectrum (or None) and of every core's bottom and
        # top: ChainFactors.unpack on indices instead of tensors
        self.indices = [ChainFactors.unpack(p.layout, range(len(flat))) for (_, p), flat in zip(members, flats)]
        self.signature = self._signature(flats)
        layouts = defaultdict(list)
        for i, (layout, (dtype, device)) in enumerate(zip(self.layout_of, self.signature)):
            layouts[(layout, dtype, device)].append(i)
        self.layouts = dict(layouts)
        self.slots = [None] * len(members)
        for lkey, group in self.layouts.items():
            for j, i in enumerate(group):
                self.slots[i] = (lkey, j)
        # a (layout, core) block is a contiguous run of its frame shape's stack
        items = defaultdict(list)  # frame key -> [(member, bottom index, top index)]
        self.blocks = defaultdict(list)
        self.where = {}
        for lkey, group in self.layouts.items():
            for k, core in enumerate(lkey[0].cores):
                fkey = (core.rows, core.cols, core.reduced, lkey[1], lkey[2])
                self.where[lkey, k] = (fkey, len(self.blocks[fkey]))
                self.blocks[fkey].append(len(group))
                items[fkey].extend((i, *self.indices[i].cores[k]) for i in group)
        self.frame_calls = [[(fkey, items[fkey]) for fkey in fkeys]
                            for fkeys in _frame_groups({fkey: len(v) for fkey, v in items.items()})]

    def _signature(self, flats: list[tuple[Tensor, ...]]) -> tuple:
        """(dtype, device) of every member's first frame factor (core 0's bottom): what the
        grouping reads of the tensors."""
        return tuple((flat[ix.cores[0].bottom].dtype, flat[ix.cores[0].bottom].device)
                     for flat, ix in zip(flats, self.indices))

    def matches(self, members: list[tuple[nn.Module, nn.Module]], flats: list[tuple[Tensor, ...]]) -> bool:
        """Whether the plan holds for ``members`` now: the same layouts, dtypes and devices."""
        return (len(members) == len(self.layout_of)
                and all(p.layout is layout for (_, p), layout in zip(members, self.layout_of))
                and self._signature(flats) == self.signature)


class BatchedBuild:
    """One batched build of chain layers (module docstring): the frames, one WY call per frame
    shape, made at once; per layout, the contraction to each layer's weight or to its factors,
    batched over the layout, the first time one of its layers asks for that form."""

    def __init__(self, members: list[tuple[nn.Module, nn.Module]], plans: dict | None = None):
        from sttpfast.params.chain import scaled_spectrum

        self.ids = [id(p) for _, p in members]
        flats = [factors_of(layer) for layer, _ in members]
        key = tuple(self.ids)
        plan = None if plans is None else plans.get(key)
        if plan is None or not plan.matches(members, flats):
            plan = BuildPlan(members, flats)
            if plans is not None:
                plans[key] = plan
        self.device = flats[0][0].device
        #: whether the frames carry gradients (built with autograd recording)
        self.grad_enabled = torch.is_grad_enabled()
        #: called on every tensor handed out (the loose pass watches their backward)
        self.on_hand_out = None
        #: the ids of the members handed a weight or factors: only their factors get gradients
        self.handed: set[int] = set()
        frames = _batched_frames(plan, flats, self.ids, self.handed)
        self._groups = {}  # layout key -> (layout, frames per core (B, rows, cols), g s (B, r))
        for lkey, group in plan.layouts.items():
            layout = lkey[0]
            raw = _stack([flats[i][plan.indices[i].spectrum] for i in group], [self.ids[i] for i in group],
                         self.handed) if layout.learned else None
            gains = torch.stack([members[i][1]._buffers["gain"] for i in group])
            spectrum = scaled_spectrum(raw, gains, layout.rank)
            self._groups[lkey] = (layout, frames[lkey], spectrum)
        self._slot = dict(zip(self.ids, plan.slots))  # id(parametrization) -> (layout key, index in it)
        self._contracted = {}  # (layout key, form) -> per-layer operand pairs

    def _operands(self, pid: int, form: str) -> tuple[Tensor, Tensor]:
        from sttpfast.params.chain import factor_operands, root_operands

        lkey, i = self._slot[pid]
        if (lkey, form) not in self._contracted:
            layout, frames, spectrum = self._groups[lkey]
            left, right = (root_operands if form == "weight" else factor_operands)(layout, frames, spectrum)
            # one unbind, not an index per layer: an index's backward writes zeros of the whole batch
            self._contracted[lkey, form] = list(zip(left.unbind(0), right.unbind(0)))
        return self._contracted[lkey, form][i]

    def _handed(self, t: Tensor) -> Tensor:
        if self.on_hand_out is not None:
            self.on_hand_out(t)
        return t

    def weight(self, pid: int) -> Tensor:
        """``W (d_out, d_in)`` of the layer whose parametrization has id ``pid``: the last matmul
        of the contraction, per layer (each weight its own tensor: unbinding a batched weight
        would cost a copy of every weight's gradient in backward)."""
        self.handed.add(pid)
        left, right = self._operands(pid, "weight")
        layout = self._groups[self._slot[pid][0]][0]
        return self._handed((left @ right).reshape(math.prod(layout.out_modes), -1))

    def factors(self, pid: int) -> tuple[Tensor, Tensor]:
        """``(U diag(g s) (d_out, r), V^T (r, d_in))`` of the layer whose parametrization has id ``pid``."""
        self.handed.add(pid)
        u, v_t = self._operands(pid, "factors")
        return self._handed(u), self._handed(v_t)


def build_weights(members: list[tuple[nn.Module, nn.Module]], plans: dict | None = None) -> BatchedBuild:
    """The batched build of chain layers ``(layer, parametrization)``: every weight or factor
    pair it hands out (:meth:`BatchedBuild.weight`, :meth:`BatchedBuild.factors`) comes from
    the same batched calls. ``plans`` (a bank's) keeps the :class:`BuildPlan` of each member
    list between builds."""
    return BatchedBuild(members, plans)


def _batched_frames(plan: BuildPlan, flats: list[tuple[Tensor, ...]], ids: list[int], handed: set) -> dict:
    """``{layout key: [frames of core k, (B, rows, cols)]}`` of the plan's layouts, one WY call
    per entry of ``plan.frame_calls``, from the members' flat factors ``flats``; ``ids`` (the
    members' parametrization ids) and ``handed`` gate the gradients (:class:`_StackOfUsed`)."""
    built = {}  # frame key -> its frames, one tensor per block
    for call in plan.frame_calls:
        rows = call[-1][0][0]  # ascending: the call's frames are padded to its largest
        bottoms, tops = [], []
        for fkey, items in call:
            owners = [ids[i] for i, _, _ in items]
            stacked = _stack([flats[i][b] for i, b, _ in items], owners, handed)
            # zero rows below a frame's own: its reflectors, and so its first rows, are the same
            bottoms.append(stacked if fkey[0] == rows else F.pad(stacked, (0, 0, 0, rows - fkey[0])))
            if not fkey[2]:
                tops.append(_stack([flats[i][t] for i, _, t in items], owners, handed))
        frames = householder_frame(_cat(bottoms), _cat(tops) if tops else None)
        # one split, not a slice per block: a slice's backward writes zeros of the whole stack
        parts = frames.split([len(items) for _, items in call]) if len(call) > 1 else (frames,)
        for (fkey, _), part in zip(call, parts):
            built[fkey] = (part if fkey[0] == rows else part[:, :fkey[0]]).split(plan.blocks[fkey])
    return {lkey: [built[fkey][i] for fkey, i in (plan.where[lkey, k] for k in range(len(lkey[0].cores)))]
            for lkey in plan.layouts}


class _StackOfUsed(torch.autograd.Function):
    """``torch.stack(tensors)`` whose backward gives the tensors of members a build never
    handed out no gradient (None) instead of zeros: an optimizer skips a parameter without a
    gradient, while zeros let momentum, Adam and weight decay move a layer no forward used
    (another head of the model). ``handed`` (the build's set of handed-out ids) is read when
    the backward runs, after the pass; ``owners`` names each tensor's member."""

    @staticmethod
    def forward(ctx, handed: set, owners: list, *tensors):
        ctx.handed, ctx.owners = handed, owners
        return torch.stack(tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        parts = grad.unbind(0)
        return (None, None, *(part if need and owner in ctx.handed else None
                              for part, owner, need in zip(parts, ctx.owners, ctx.needs_input_grad[2:])))


def _stack(tensors: list[Tensor], owners: list[int], handed: set) -> Tensor:
    """Stack members' factors: gated by ``handed`` (see :class:`_StackOfUsed`) where autograd
    records, a plain ``torch.stack`` otherwise, and under ``torch.compile``: AOT autograd traces
    the backward before the pass has handed anything out, so the gate would drop every gradient
    (a compiled step then gives an unused layer zeros, as before the gate). Under torch.func's
    transforms too (they take gradients of every input; the gate is not in their form)."""
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or not any(t.requires_grad for t in tensors)):
        return torch.stack(tensors)
    return _StackOfUsed.apply(handed, owners, *tensors)


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


#: the fixed cost of one WY call (forward and backward: some twenty small kernels), in
#: multiply-adds: measured on a 2-core CPU, a call on tiny frames costs ~350 us, the time of
#: ~5M multiply-adds of a WY call on large ones (10-20 G/s)
WY_CALL_COST = 5_000_000


def _frame_groups(counts: dict[tuple, int]) -> list[list[tuple]]:
    """Frame shapes (``{(rows, cols, reduced, dtype, device): number of frames}``) grouped for
    one WY call each: shapes of equal ``cols`` and kind, in ascending ``rows``, join a group
    (their bottoms padded with zero rows to its largest) while that costs less than a call of
    their own, by multiply-adds (``4 rows cols^2`` per frame, forward and backward) plus
    :data:`WY_CALL_COST` per call. The constant ``-I`` frames of square ``St_U`` shapes, which
    no WY call builds, stay alone."""
    kinds = defaultdict(list)
    groups = []
    for fkey in counts:
        rows, cols, reduced = fkey[:3]
        if reduced and rows == cols:
            groups.append([fkey])
        else:
            kinds[fkey[1:]].append(fkey)

    def cost(fkeys):
        return WY_CALL_COST + 4 * fkeys[-1][0] * fkeys[-1][1] ** 2 * sum(counts[f] for f in fkeys)
    for fkeys in kinds.values():
        fkeys.sort(key=lambda fkey: fkey[0])
        group = [fkeys[0]]
        for fkey in fkeys[1:]:
            if cost(group + [fkey]) <= cost(group) + cost([fkey]):
                group.append(fkey)
            else:
                groups.append(group)
                group = [fkey]
        groups.append(group)
    return groups


def frame_bank_of(model: nn.Module) -> FrameBank | None:
    """The bank owned by ``model`` (the root ``parameterize`` was called on), or None."""
    return model.__dict__.get(_ATTR)


def detach_frame_bank(model: nn.Module) -> None:
    """Switch batching off for ``model``: remove its bank (hooks and references), if any."""
    bank = model.__dict__.pop(_ATTR, None)
    if bank is None:
        return
    for scope in bank.scopes:
        for handle in scope.handles:
            handle.remove()
    for name in ROOT_METHODS:
        if isinstance(model.__dict__.get(name), _ScopedMethod):
            del model.__dict__[name]
    for _, p in bank.members:
        if p.__dict__.get("frame_bank") is bank:
            p.__dict__.pop("frame_bank")


def attach_frame_bank(model: nn.Module) -> FrameBank | None:
    """(Re)build the bank of every spectral-chain layer under ``model``; None if fewer than two."""
    detach_frame_bank(model)
    members = [(m, p) for _, m, p in parameterized_layers(model) if callable(getattr(p, "chain_factors", None))]
    if len(members) < 2:
        return None
    for _, p in members:  # a layer belongs to one bank: the newest tree that contains it
        old = p.__dict__.get("frame_bank")
        for root in ([] if old is None else [m for m in model.modules() if m.__dict__.get(_ATTR) is old]):
            detach_frame_bank(root)
    bank = FrameBank(members)
    by_layer = {id(m): (m, p) for m, p in members}
    for module in model.modules():
        inside = [by_layer[id(m)] for m in module.modules() if id(m) in by_layer]
        if len(inside) >= 2:
            bank.scopes.append(_Scope(bank, module, inside))
    for name in ROOT_METHODS:
        if callable(getattr(type(model), name, None)):  # scopes[0] is the root's: it holds every layer
            model.__dict__[name] = _ScopedMethod(bank.scopes[0], model, name)
    for _, p in members:
        p.__dict__["frame_bank"] = bank  # a plain attribute: not a submodule, not in state_dict
    model.__dict__[_ATTR] = bank
    return bank
