"""Every fast path of the weight build equals a plain, slow reference build (float64, 1e-10
relative, forward and gradients): the per-layer build (bank switched off), the frame bank
(batched frames, batched contraction) and the contraction order of fewest FLOPs.

The reference here is written out independently of the library's fast code: frames by
``r`` sequential Householder reflections, the cores reshaped to ``(R_{k-1}, n_k, R_k)``
and the whole chain contracted with one ``torch.einsum`` per side, then ``U diag(g s) V^T``.
"""
import copy
import string

import pytest
import torch
from torch import nn

import sttpfast
from sttpfast.linalg.householder import sequential_householder_frame
from sttpfast.params.chain import ChainLayout, build_flops, contraction_plan, segment_plan
from sttpfast.params.frame_bank import detach_frame_bank
from sttpfast.params.layers import factors_of, parameterized_layers

RTOL = 1e-10


def reference_weight(p, factors) -> torch.Tensor:
    """``W`` of one chain layer, built the plain way (see the module docstring)."""
    lay = p.layout
    chain = p.chain_factors(factors)
    frames = [sequential_householder_frame(c.bottom, c.top) for c in chain.cores]
    n_out = len(lay.out_modes)
    cores = []
    for k, (core, frame) in enumerate(zip(lay.cores, frames)):
        if k < n_out:  # (R_{k-1} n_k) x R_k
            cores.append(frame.reshape(core.left_rank, core.mode, core.right_rank))
        else:  # (n_k R_k) x R_{k-1}, the transposed core
            cores.append(frame.T.reshape(core.left_rank, core.mode, core.right_rank))
    letters = iter(string.ascii_letters)

    def side(side_cores):
        bonds = [next(letters) for _ in range(len(side_cores) + 1)]
        modes = [next(letters) for _ in side_cores]
        terms = [bonds[i] + modes[i] + bonds[i + 1] for i in range(len(side_cores))]
        out = bonds[0] + "".join(modes) + bonds[-1]
        return torch.einsum(",".join(terms) + "->" + out, *side_cores)

    u = side(cores[:n_out]).reshape(-1, lay.rank)  # (1, n.., r) -> (d_out, r)
    v_t = side(cores[n_out:]).reshape(lay.rank, -1)  # (r, m.., 1) -> (r, d_in)
    s = torch.ones(lay.rank, dtype=u.dtype) if chain.spectrum is None else chain.spectrum / chain.spectrum.abs().max()
    matrix = torch.einsum("ia,a,aj->ij", u, p.gain * s, v_t)
    return p.view.from_matrix(matrix)


class Net(nn.Module):
    """Layers whose chains differ: 3x3 convs (two of one layout, for the bank's batching),
    a 1x1 conv, a transposed conv, a square Linear and a wide one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.d = nn.Conv2d(6, 12, 1)
        self.e = nn.ConvTranspose2d(12, 4, 2)
        self.f = nn.Linear(4, 4)
        self.g = nn.Linear(4, 10)

    def forward(self, x):
        x = self.d(self.c(self.b(self.a(x)).relu()).relu())
        x = self.e(x).mean((-2, -1))
        return self.g(self.f(x).relu())


def model_pair(param, rank, init):
    """The same float64 model with the frame bank and without it (spectral init: gains != 1)."""
    torch.manual_seed(0)
    model = Net().double()
    sttpfast.parameterize(model, param, rank=rank, init=init)
    with torch.no_grad():  # leave the identity: frames differ from -E in every entry
        for _, layer, _ in parameterized_layers(model):
            for t in factors_of(layer):
                t.add_(0.3 * torch.randn_like(t))
    plain = Net().double()
    sttpfast.parameterize(plain, param, rank=rank, init=init, frame_bank=False)
    plain.load_state_dict(model.state_dict())
    return model, plain


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("param,rank,init", [("sttp-r", 3, "identity"), ("sttp-c", 4, "spectral"),
                                             ("svdp-l", 3, "spectral"), ("svdp-c", None, "identity")])
def test_bank_and_per_layer_builds_equal_the_reference(param, rank, init):
    model, plain = model_pair(param, rank, init)
    layers = [(layer, p) for _, layer, p in parameterized_layers(model)]
    plain_layers = [layer for _, layer, _ in parameterized_layers(plain)]
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64) for layer, _ in layers]
    factors = [f for layer, _ in layers for f in factors_of(layer) if f.requires_grad]
    plain_factors = [f for layer in plain_layers for f in factors_of(layer) if f.requires_grad]

    ref = [reference_weight(p, factors_of(layer)) for layer, p in layers]
    ref_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(ref, probes)), factors)
    # the bank builds inside a forward pass of the model
    model.forward = lambda: [layer.weight for layer, _ in layers]
    bank = model()
    del model.forward
    bank_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(bank, probes)), factors)
    per_layer = [layer.weight for layer in plain_layers]
    per_layer_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(per_layer, probes)), plain_factors)

    for got, got_grads in ((bank, bank_grads), (per_layer, per_layer_grads)):
        assert max(relative(w, r) for w, r in zip(got, ref)) < RTOL
        # empty factors (St_U of a square frame) have nothing to compare
        assert max(relative(g, r) for g, r in zip(got_grads, ref_grads) if r.numel()) < RTOL


def tree_cost(lay, node):
    """(first core, last core, multiply-adds) of contracting ``node`` in ``lay``'s chain."""
    if isinstance(node, int):
        return node, node, 0
    a, m, left = tree_cost(lay, node[0])
    _, b, right = tree_cost(lay, node[1])
    modes = lay.out_modes + lay.in_modes
    span = 1
    for n in modes[a:b + 1]:
        span *= n
    # a U-core alone on the left, or a V-core alone on the right, whose frame is -I (square,
    # on St_U) and which does not carry the spectrum (the last U-core does) is a sign: free
    n_out = len(lay.out_modes)

    def minus_identity(k):
        c = lay.cores[k]
        return c.reduced and c.rows == c.cols and k != n_out - 1
    if (a == m < n_out and minus_identity(a)) or (m + 1 == b >= n_out and minus_identity(b)):
        return a, b, left + right
    return a, b, left + right + lay.ranks[a] * span * lay.ranks[b + 1] * lay.ranks[m + 1]


def all_trees(a, b):
    if a == b:
        yield a
        return
    for m in range(a, b):
        for left in all_trees(a, m):
            for right in all_trees(m + 1, b):
                yield left, right


def test_contraction_plan_is_the_cheapest_of_all_orders():
    # Linear(12 -> 20) at rank 3: modes 2 2 5 | 2 2 3 1, 7 cores, 132 orders
    lay = ChainLayout.build([2, 2, 5], [2, 2, 3, 1], 3, True)
    tree, flops = contraction_plan(lay)
    costs = [tree_cost(lay, t)[2] for t in all_trees(0, 6)]
    assert len(costs) == 132
    assert flops == tree_cost(lay, tree)[2] == min(costs)


def test_contraction_plan_beats_the_two_sweeps_on_a_wide_conv():
    # WRN-28-10's 640 -> 640 3x3 conv at rank 32: modes 2^7 5 | 2^7 5 9
    lay = ChainLayout.build([2] * 7 + [5], [2] * 7 + [5, 9], 32, True)
    n_out = 8
    u_sweep = ((((((((0, 1), 2), 3), 4), 5), 6), 7))
    v_sweep = 16
    for k in range(15, n_out - 1, -1):
        v_sweep = (k, v_sweep)
    _, flops = contraction_plan(lay)
    # the two sweeps, then U V^T through the rank-32 bond, against the cheapest order;
    # the final product alone is 640 * 32 * 5760 = 117,964,800
    assert (tree_cost(lay, (u_sweep, v_sweep))[2], flops) == (130539776, 123648000)


@pytest.mark.parametrize("param,rank,init", [("sttp-r", 3, "identity"), ("sttp-c", 4, "spectral"),
                                             ("svdp-l", 3, "spectral"), ("svdp-c", None, "identity")])
def test_factor_pairs_of_the_factorized_forward_equal_the_reference(param, rank, init):
    # (U diag(g s), V^T) as the factorized forward gets them (sttpfast.params.factorized), from the
    # bank and per layer: their product is the reference W, with the reference's gradients
    model, plain = model_pair(param, rank, init)
    layers = [(layer, p) for _, layer, p in parameterized_layers(model) if not p.view.transposed]
    plain_layers = [(layer, p) for _, layer, p in parameterized_layers(plain) if not p.view.transposed]
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(p.view.d_out, p.view.d_in, generator=gen, dtype=torch.float64) for _, p in layers]
    ref = [p.view.to_matrix(reference_weight(p, factors_of(layer))) for layer, p in layers]
    factors = [f for layer, _ in layers for f in factors_of(layer) if f.requires_grad]
    ref_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(ref, probes)), factors)

    def products(pairs):
        return [last @ kernel.reshape(kernel.shape[0], -1) for _, kernel, last, _ in pairs]
    model.forward = lambda: [p.conv_factors(factors_of(layer)) for layer, p in layers]
    bank = products(model())  # inside a pass of the model: the bank's batched factors
    del model.forward
    per_layer = products([p.conv_factors(factors_of(layer)) for layer, p in plain_layers])
    plain_factors = [f for layer, _ in plain_layers for f in factors_of(layer) if f.requires_grad]
    for got, wrt in ((bank, factors), (per_layer, plain_factors)):
        grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(got, probes)), wrt)
        assert max(relative(w, r) for w, r in zip(got, ref)) < RTOL
        assert max(relative(g, r) for g, r in zip(grads, ref_grads) if r.numel()) < RTOL


def test_segment_plans_are_the_cheapest_orders_of_each_side():
    # Linear(12 -> 20) at rank 3: U side 2 2 5 (cores 0-2), V side 2 2 3 1 (cores 3-6)
    lay = ChainLayout.build([2, 2, 5], [2, 2, 3, 1], 3, True)
    for first, last, count in ((0, 2, 2), (3, 6, 5)):
        tree, flops = segment_plan(lay, first, last)
        costs = [tree_cost(lay, t)[2] for t in all_trees(first, last)]
        assert len(costs) == count
        assert flops == tree_cost(lay, tree)[2] == min(costs)
    assert build_flops(lay) == (contraction_plan(lay)[1], segment_plan(lay, 0, 2)[1] + segment_plan(lay, 3, 6)[1])


def test_batched_d_optimal_penalty_equals_the_per_layer_one_bitwise():
    """The penalty stacks the spectra of equal rank: the same value, bit for bit, as
    ``-mean(cat(log|s|))`` over the layers one by one, in layer order, and the same gradients."""
    from sttpfast.penalties import d_optimal_penalty

    torch.manual_seed(0)
    model = Net().double()
    sttpfast.parameterize(model, "sttp-r", rank=3)
    for _, m, _ in parameterized_layers(model):  # spectra away from the identity init
        with torch.no_grad():
            factors_of(m)[0].copy_(torch.rand_like(factors_of(m)[0]) + 0.1)
    ranks = [p.rank for _, _, p in parameterized_layers(model)]
    assert len(set(ranks)) < len(ranks)  # some layers share a rank: a batched group exists
    batched = d_optimal_penalty(model)
    spectra = [factors_of(m)[0] for _, m, _ in parameterized_layers(model)]
    reference = -torch.cat([torch.log((s / s.abs().max()).abs()) for s in spectra]).mean()
    assert batched.item() == reference.item()
    got = torch.autograd.grad(batched, spectra)
    want = torch.autograd.grad(reference, spectra)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_factors_of_reads_buffers_and_parameters_as_getattr_does():
    """factors_of returns exactly the tensors that getattr gives, in order, also where a
    factor is a buffer (parametrize registers a factor that is not a Parameter as one)."""
    model = Net()
    sttpfast.parameterize(model, "sttp-r", rank=2)
    layers = [m for _, m, _ in parameterized_layers(model)]
    assert len(layers) == 7  # Net's layers
    plist = layers[0].parametrizations.weight
    name = next(iter(plist._parameters))  # one more buffer, of a non-empty factor
    plist._buffers[name] = plist._parameters.pop(name).detach()
    for layer in layers:
        plist = layer.parametrizations.weight
        want = tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
        got = factors_of(layer)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
    assert not isinstance(plist_factor := getattr(layers[0].parametrizations.weight, name), nn.Parameter)
    assert any(t is plist_factor for t in factors_of(layers[0]))
    with pytest.raises(AttributeError):
        factors_of(nn.Linear(2, 2))


class Twin(nn.Module):
    """One layer, or two of the same shape on the same input (a bank of two)."""

    def __init__(self, a, b=None):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) if self.b is None else self.a(x) + self.b(x)


@pytest.mark.parametrize("shape,rank", [((16, 16), 4), ((64, 32), 32), ((16, 8, 3, 3), 8), ((32, 64, 1, 1), 32)])
@pytest.mark.parametrize("bank", [False, True])
def test_absorbed_minus_identity_cores_give_the_reference_weight_and_gradients(shape, rank, bank):
    """Chains with many -I cores (square St_U frames), which the contraction absorbs as signs:
    the weight and its gradients equal the reference (every frame built and contracted), per
    layer and in the bank; the empty factors of the absorbed cores still get (empty) gradients."""
    torch.manual_seed(0)
    make = (lambda: nn.Linear(shape[1], shape[0])) if len(shape) == 2 else \
        (lambda: nn.Conv2d(shape[1], shape[0], shape[2]))
    model = Twin(make(), make() if bank else None).double()
    sttpfast.parameterize(model, "sttp-r", rank=rank)
    layers = [(m, p) for _, m, p in parameterized_layers(model)]
    with torch.no_grad():
        for layer, _ in layers:
            for t in factors_of(layer):
                t.add_(0.3 * torch.randn_like(t))
    assert all(any(p.layout.absorbable) for _, p in layers)
    factors = [f for layer, _ in layers for f in factors_of(layer) if f.requires_grad]
    probes = [torch.randn(p.view.shape, dtype=torch.float64) for _, p in layers]
    model.train()
    model(torch.randn(2, shape[1], *([3] * (len(shape) - 2)), dtype=torch.float64))  # a pass opens the bank
    got = [layer.weight for layer, _ in layers]
    want = [reference_weight(p, factors_of(layer)) for layer, p in layers]
    for w, ref in zip(got, want):
        assert relative(w, ref) < RTOL
    got_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(got, probes)), factors)
    want_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(want, probes)), factors)
    for a, b in zip(got_grads, want_grads):
        assert a.shape == b.shape
        if b.numel():
            assert relative(a, b) < RTOL


def test_frame_shapes_share_a_wy_call_where_padding_costs_less_than_a_call():
    from sttpfast.params.frame_bank import WY_CALL_COST, _frame_groups

    f32, cpu = torch.float32, torch.device("cpu")
    counts = {(16, 8, False, f32, cpu): 3, (27, 8, False, f32, cpu): 2, (64, 8, False, f32, cpu): 1,
              (8, 8, True, f32, cpu): 4, (32, 8, True, f32, cpu): 2, (16, 8, False, torch.float64, cpu): 1,
              # resnet18's at Z 10%: padding 11 frames to 216 rows costs more than a call
              (128, 108, True, f32, cpu): 11, (216, 108, True, f32, cpu): 42}
    assert WY_CALL_COST + 4 * 216 * 108 ** 2 * 53 > 2 * WY_CALL_COST + 4 * 108 ** 2 * (128 * 11 + 216 * 42)
    groups = sorted((sorted(group, key=str) for group in _frame_groups(counts)), key=str)
    expected = [[(8, 8, True, f32, cpu)],  # the constant -I of a square St_U frame: no WY call
                [(16, 8, False, f32, cpu), (27, 8, False, f32, cpu), (64, 8, False, f32, cpu)],
                [(16, 8, False, torch.float64, cpu)], [(32, 8, True, f32, cpu)],
                [(128, 108, True, f32, cpu)], [(216, 108, True, f32, cpu)]]
    assert groups == sorted((sorted(group, key=str) for group in expected), key=str)


def test_empty_factors_are_buffers_and_checkpoints_keep_their_keys():
    """The empty (0, r) factors of square St_U frames hold no degree of freedom: buffers, not
    parameters (no gradient, no optimizer update); state_dict keys and DOF are unchanged."""
    torch.manual_seed(0)
    model = Net()
    sttpfast.parameterize(model, "sttp-r", rank=3)
    empties = [(name, t) for name, t in model.state_dict().items() if t.numel() == 0]
    assert empties  # Net's chains have square St_U frames
    params = dict(model.named_parameters())
    assert all(name not in params for name, _ in empties)
    assert all(t.numel() for t in params.values())
    report_dof = sum(p.dof for _, _, p in parameterized_layers(model))
    assert report_dof == sum(t.numel() for name, t in params.items() if "parametrizations" in name)
    copy = Net()
    sttpfast.parameterize(copy, "sttp-r", rank=3)
    copy.load_state_dict(model.state_dict())  # strict: the same keys
    assert set(copy.state_dict()) == set(model.state_dict())


def test_resnet20_sttp_r32_frames_square_cores_wy_calls_and_empty_factors():
    """The structure behind the numbers in README ("How the weights are built") and in the
    docstrings: resnet20_cifar sttp-r at rank 32 has 233 frames, 136 of them the constant -I of
    a square St_U frame, built in 5 WY calls; 152 of its 299 factors are empty buffers."""
    from collections import Counter

    from sttpfast.models import create_model
    from sttpfast.params.frame_bank import _frame_groups

    torch.manual_seed(0)
    model = create_model("resnet20_cifar", num_classes=10)
    sttpfast.parameterize(model, "sttp-r", rank=32)
    counts = Counter()
    for _, _, p in parameterized_layers(model):
        for core in p.layout.cores:
            counts[(core.rows, core.cols, core.reduced, torch.float32, torch.device("cpu"))] += 1
    assert (sum(counts.values()), len(counts)) == (233, 19)  # frames, frame shapes
    assert sum(n for (rows, cols, reduced, *_), n in counts.items() if reduced and rows == cols) == 136
    wy_calls = [g for g in _frame_groups(dict(counts)) if not (g[0][2] and g[0][0] == g[0][1])]
    assert len(wy_calls) == 5
    factors = [t for _, m, _ in parameterized_layers(model) for t in factors_of(m)]
    assert (sum(1 for t in factors if t.numel() == 0), len(factors)) == (152, 299)
    assert all(not isinstance(t, nn.Parameter) for t in factors if t.numel() == 0)


class _FrozenFeatures(nn.Module):
    """A frozen part of the forward under no_grad, then a trained head (a user's pattern)."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.feat(x)
        return self.head(h)


def test_a_layer_asking_with_grad_after_a_no_grad_build_gets_gradients():
    # the pass's batched build ran at the first request, under no_grad, and the head reused it:
    # its factors got no gradient and never trained, without a word
    grads = []
    for bank in (True, False):
        torch.manual_seed(0)
        model = _FrozenFeatures().double()
        sttpfast.parameterize(model, "svdp-r", rank=3, frame_bank=bank)
        model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
        grads.append([p.grad for p in factors_of(model.head) if p.requires_grad])
    assert len(grads[0]) == 4 and all(g is not None for g in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_weight_read_after_a_data_update_is_not_stale():
    # fastai's optimizers step with p.data.add_, which leaves the version counter alone: a
    # callback reading a layer's weight after the step got the build from before it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    sttpfast.parameterize(model, "svdp-r", rank=4, init="spectral")
    reference = copy.deepcopy(model)
    detach_frame_bank(reference)
    with torch.no_grad():
        _ = model[0].weight  # opens a loose pass holding every layer's weight
        for m in (model, reference):
            factors_of(m[2])[1].data.add_(0.3)
        assert torch.allclose(model[2].weight, reference[2].weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["densify", "remove_parametrizations"])
def test_a_layer_made_dense_again_leaves_the_model_working(how):
    # the root's frame bank still listed the layer: forward and backward ended in
    # KeyError: 'parametrizations'
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    sttpfast.parameterize(model, "svdp-r", rank=4, init="spectral")
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    if how == "densify":
        sttpfast.densify(model[0], inplace=True)
    else:
        parametrize.remove_parametrizations(model[2], "weight")
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, before, rtol=1e-10, atol=1e-12)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x, head="a"):
        return getattr(self, head)(torch.tanh(self.body(x)))


@pytest.mark.parametrize("param", ["svdp-r", "sttp-r"])
def test_a_layer_unused_in_a_forward_gets_no_gradient_with_the_bank(param):
    # the batched build gave it zeros instead of None: momentum and Adam kept moving a head
    # that no forward used (18% in 5 steps)
    torch.manual_seed(0)
    model = _TwoHeads().double()
    sttpfast.parameterize(model, param, rank=3)
    model(torch.randn(4, 6, dtype=torch.float64), head="a").sum().backward()
    assert [p.grad for p in factors_of(model.b) if p.requires_grad] == [None] * len(
        [p for p in factors_of(model.b) if p.requires_grad])
    assert all(p.grad is not None for p in factors_of(model.a) if p.requires_grad)
