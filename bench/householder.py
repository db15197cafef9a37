"""Benchmark 1: Householder frames, forward + backward.

Two tables:

* ``network``: the number users feel. The weight build of a whole network per training
  step: every parameterized layer of resnet20_cifar, wrn16_4 and sngan_d32 (sttp-r and
  svdp-r, rank 32), forward and backward. sttpfast builds the weights as a training step
  does, inside one forward pass of the model, where the frame bank builds all frames of a
  shape in one batched WY call and contracts equal layouts together; the reference builds
  them as the STTP reference code does, one ``torch_householder_orgqr`` call per frame, then
  the same chain contraction layer by layer. Both must give the same weights: the table
  prints the largest difference of the weights and of their gradients.
* ``frames``: single frame shapes that STTP / SVDP layers of WRN-28-10 (r = 32, 64) and the
  SNGAN CIFAR discriminator (r = 64) create; sttpfast's compact-WY frames vs the
  torch-householder package vs ``torch.linalg.householder_product``, each from the same
  reflector parameters, building the ``n x r`` frame and back-propagating a random
  linear loss.

Methods run interleaved; the tables give medians and the per-repeat speed-up of sttpfast
over each baseline (median, min-max).

    python bench/householder.py [--tables network frames] [--device cuda] [--repeats 15]
    python bench/householder.py --tables network --networks wrn16_4 --params sttp-r
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import baseline_columns, interleaved, machine, markdown_table, median, ratio_stats, set_threads  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.linalg.householder import householder_frame, reflectors_from_params  # noqa: E402
from sttpfast.models import create_model  # noqa: E402
from sttpfast.surgery import parameterized_layers  # noqa: E402


# ---------------------------------------------------------------------------------------
# the one place that reads a spectral chain's internals (how its factors are stored);
# adapt it, and only it, when that storage changes
def chain_of(layer: torch.nn.Module):
    """A spectral-chain layer's reflector parameters and how its weight is made from frames.

    Returns ``(reflectors, assemble)``: ``reflectors`` is one ``(bottom, top or None)`` pair
    per core (``bottom`` ``(n - r, r)``, ``top`` ``(r (r - 1) / 2,)``, None on St_U), and
    ``assemble(frames)`` turns one ``(n, r)`` frame per core into the layer's weight (in the
    layer's own shape) by the project's chain contraction and spectrum.
    """
    from sttpfast.params.base import learned_spectrum
    from sttpfast.params.chain import contract_chain, weight_matrix
    from sttpfast.surgery import factors_of, parametrization_of

    p = parametrization_of(layer)
    factors = p.chain_factors(factors_of(layer))
    raw, reflectors = factors.spectrum, [(core.bottom, core.top) for core in factors.cores]

    def assemble(frames: list[torch.Tensor]) -> torch.Tensor:
        u, v = contract_chain(p.layout, frames)
        spectrum = None if raw is None else learned_spectrum(raw)
        return p.view.from_matrix(weight_matrix(u, spectrum, v))

    return reflectors, assemble


def frame_shape(bottom: torch.Tensor) -> tuple[int, int]:
    """``(n, r)`` of the frame whose reflector block below the top ``r x r`` is ``bottom``."""
    return bottom.shape[-2] + bottom.shape[-1], bottom.shape[-1]


# ---------------------------------------------------------------------------------------
# network table: the weight build of a whole model per training step
def model_under_test(arch: str, param: str, rank: int, dtype, device, seed: int = 0) -> torch.nn.Module:
    """``arch`` parameterized with ``param`` at ``rank``, factors drawn from N(0, 0.5^2).

    Random factors (not the identity init, whose frames are all close to ``-E``) make the
    weight check compare frames that differ from the identity in every entry."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=None if arch.startswith("sngan") else 10)
    report = sttpfast.parameterize(model, param, rank=rank)
    model = model.to(dtype=dtype, device=device)
    with torch.no_grad():
        for _, layer, _ in parameterized_layers(model):
            for factor in layer.parametrizations.weight.parameters():
                factor.normal_(0.0, 0.5)
    model.z = report.z
    return model


def batched_weights(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Every layer's weight, built the way a training step builds it: inside one forward
    pass of ``model`` (whose hooks run the frame bank), with the network's own compute
    replaced by reading the weights."""
    model.forward = lambda: [layer.weight for layer in layers]  # an instance attribute, for one call
    try:
        return model()
    finally:
        del model.forward


def per_layer_weights(layers: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Every layer's weight, each layer building its own frames (one WY call per frame)."""
    return [layer.weight for layer in layers]


def per_frame_weights(layers: list[torch.nn.Module], orgqr) -> list[torch.Tensor]:
    """Every layer's weight as the reference code builds it: one ``orgqr`` call per frame."""
    out = []
    for layer in layers:
        reflectors, assemble = chain_of(layer)
        out.append(assemble([orgqr(reflectors_from_params(bottom, top)) for bottom, top in reflectors]))
    return out


def floor_step(layers: list[torch.nn.Module], loss_of):
    """The floor of a weight build: the final products ``U diag(s) V^T`` alone (forward and
    backward to ``U``, ``s``, ``V``), from precomputed ``U``, ``s``, ``V`` of every layer."""
    from sttpfast.params.chain import weight_matrix
    from sttpfast.surgery import factors_of, parametrization_of

    svd = []
    with torch.no_grad():
        for layer in layers:
            p = parametrization_of(layer)
            u, s, v = p.svd_factors(*factors_of(layer))
            svd.append((p, *(t.clone().requires_grad_(True) for t in (u, s, v))))
    leaves = [t for _, u, s, v in svd for t in (u, s, v)]

    def run():
        weights = [p.view.from_matrix(weight_matrix(u, s, v)) for p, u, s, v in svd]
        return torch.autograd.grad(loss_of(weights), leaves)
    return run


def max_abs_diff(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Largest entry difference over paired tensors (empty ones, like the factor of a
    square frame on St_U, count as 0)."""
    return max(((x - y).abs().max().item() for x, y in zip(xs, ys) if x.numel()), default=0.0)


def network_table(args, orgqr) -> None:
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    rows = []
    for arch in args.networks:
        for param in args.params:
            model = model_under_test(arch, param, args.rank, dtype, device)
            layers = [layer for _, layer, _ in parameterized_layers(model)]
            factors = [f for layer in layers for f in layer.parametrizations.weight.parameters()]
            n_frames = sum(len(chain_of(layer)[0]) for layer in layers)
            n_shapes = len({frame_shape(b) for layer in layers for b, _ in chain_of(layer)[0]})
            gen = torch.Generator().manual_seed(1)
            probes = [torch.randn(layer.weight.shape, generator=gen, dtype=dtype).to(device) for layer in layers]

            def loss_of(weights):  # a random linear loss of all weights: its gradients are the probes
                return sum((w * p).sum() for w, p in zip(weights, probes))

            def step(build):
                def run():
                    return torch.autograd.grad(loss_of(build()), factors)
                return run

            builds = {"bank": lambda: batched_weights(model, layers)}
            if args.reference == "per-layer":
                builds["per-layer WY"] = lambda: per_layer_weights(layers)
            if orgqr is not None and args.reference == "per-layer":
                builds["torch-householder"] = lambda: per_frame_weights(layers, orgqr)
            # the weight check: every path gives the same weights and the same gradients
            ref_w = [w.detach() for w in builds["bank"]()]
            ref_g = step(builds["bank"])()
            diffs = {}
            for name in builds:
                with torch.no_grad():
                    w = builds[name]()
                g = step(builds[name])()
                diffs[name] = (max_abs_diff(w, ref_w), max_abs_diff(g, ref_g))
            fns = {name: step(build) for name, build in builds.items()}
            fns["floor"] = floor_step(layers, loss_of)
            t = interleaved(fns, args.repeats, device=device)
            b_med, b_lo, b_hi = ratio_stats(t["bank"], t["floor"])
            row = [arch, param, args.rank, f"{model.z:.2f}", len(layers), f"{n_frames} / {n_shapes}",
                   f"{1e3 * median(t['bank']):.1f}", f"{1e3 * median(t['floor']):.1f}",
                   f"**{b_med:.2f}x** ({b_lo:.2f}-{b_hi:.2f})"]
            row += baseline_columns(t, "bank", ("per-layer WY", "torch-householder"), bold=True)
            name = "torch-householder" if "torch-householder" in diffs else "per-layer WY"
            row += [f"{diffs[name][0]:.1e} / {diffs[name][1]:.1e}" if name in diffs else "-"]
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    print(f"\nWeight build of a whole network per training step (all parameterized layers, forward + backward "
          f"of a random linear loss of the weights), rank {args.rank}, factors ~ N(0, 0.5^2), {args.dtype}, "
          f"{args.device}; {machine()}; {args.repeats} interleaved repeats. 'bank': the weights read inside one "
          "forward pass of the model (sttpfast's batched frames, what a training step does); 'per-layer WY': "
          "each layer builds its own frames; 'torch-householder': one torch_householder_orgqr call per frame, "
          "then the same chain contraction (the reference code's way); 'floor': the final products "
          "U diag(s) V^T alone, from precomputed U, s, V (bank / floor: per-repeat ratio). Speed-ups are per-repeat time / bank "
          "time. Max |diff|: the largest entry difference of the weights / of their gradients, "
          f"{'torch-householder' if orgqr is not None else 'per-layer WY'} vs bank.\n")
    if orgqr is None:
        print("torch-householder is not importable here (`pip install torch-householder`): "
              "its columns are left out.\n")
    print(markdown_table(["model", "param", "rank", "Z %", "layers", "frames / shapes", "bank ms", "floor ms",
                          "bank / floor",
                          "per-layer WY ms", "bank speed-up vs per-layer", "torch-householder ms",
                          "bank speed-up vs t-h", "max abs diff W / grad"], rows))


# ---------------------------------------------------------------------------------------
# frames table: one frame shape at a time
def model_frame_shapes() -> list[tuple[int, int, str]]:
    """Distinct (rows, cols) frames of the benchmarked models, with where they come from."""
    seen = {}
    for arch, params, ranks in [("wrn28_10", ["sttp-l", "svdp-l"], [32, 64]), ("sngan_d32", ["sttp-l", "svdp-l"], [64])]:
        for param in params:
            for rank in ranks:
                model = create_model(arch, num_classes=10 if arch.startswith("wrn") else None)
                sttpfast.parameterize(model, param, rank=rank)
                for _, layer, _ in parameterized_layers(model):
                    for bottom, _ in chain_of(layer)[0]:
                        seen.setdefault(frame_shape(bottom), f"{arch} {param} r{rank}")
    return sorted((n, r, src) for (n, r), src in seen.items() if r > 1)


def frames_table(args, orgqr) -> None:
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    shapes = model_frame_shapes()
    if args.max_shapes:
        shapes = shapes[:: max(1, len(shapes) // args.max_shapes)]
    rows = []
    for n, r, src in shapes:
        b = (args.batch,)
        bottom = (0.5 * torch.randn(*b, n - r, r, dtype=dtype, device=device)).requires_grad_(True)
        top = (0.5 * torch.randn(*b, r * (r - 1) // 2, dtype=dtype, device=device)).requires_grad_(True)
        probe = torch.randn(*b, n, r, dtype=dtype, device=device)

        def run(build):
            def step():  # forward, then the vector-Jacobian product for both parameter tensors
                torch.autograd.grad(build(), (bottom, top), probe)
            return step

        def linalg_frame():
            y = reflectors_from_params(bottom, top)
            return torch.linalg.householder_product(y, 2.0 / (y * y).sum(-2))

        fns = {"sttpfast WY": run(lambda: householder_frame(bottom, top)),
               "torch.linalg": run(linalg_frame)}
        if orgqr is not None:
            fns["torch-householder"] = run(lambda: orgqr(reflectors_from_params(bottom, top)))
            with torch.no_grad():  # same map: the comparison is fair
                ref = orgqr(reflectors_from_params(bottom, top))
                assert torch.allclose(householder_frame(bottom, top), ref, atol=1e-4)
        t = interleaved(fns, args.repeats, device=device)
        row = [f"{n}x{r}", src, f"{1e3 * median(t['sttpfast WY']):.3f}"]
        row += baseline_columns(t, "sttpfast WY", ("torch-householder", "torch.linalg"), ms_fmt=".3f")
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    print(f"\nHouseholder frames, forward+backward, batch {args.batch}, {args.dtype}, {args.device}; "
          f"{machine()}; {args.repeats} interleaved repeats\n")
    print(markdown_table(["frame n x r", "first seen in", "WY ms", "torch-householder ms", "speed-up vs t-h",
                          "linalg ms", "speed-up vs linalg"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", nargs="+", choices=["network", "frames"], default=["network", "frames"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--networks", nargs="+", default=["resnet20_cifar", "wrn16_4", "sngan_d32"],
                    help="network table: models")
    ap.add_argument("--params", nargs="+", default=["sttp-r", "svdp-r"], help="network table: parameterizations")
    ap.add_argument("--rank", type=int, default=32, help="network table: rank")
    ap.add_argument("--reference", choices=["per-layer", "none"], default="per-layer",
                    help="network table: time the per-layer builds too (none: bank vs floor only)")
    ap.add_argument("--max-shapes", type=int, default=0, help="frames table: 0 for all shapes")
    ap.add_argument("--batch", type=int, default=1, help="frames table: frames of each shape computed in one call")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    try:
        from torch_householder import torch_householder_orgqr
    except Exception as err:  # the package compiles a C++ extension at install or first use
        print(f"torch-householder unavailable ({err}); its columns are left out", file=sys.stderr)
        torch_householder_orgqr = None
    if "network" in args.tables:
        network_table(args, torch_householder_orgqr)
    if "frames" in args.tables:
        frames_table(args, torch_householder_orgqr)


if __name__ == "__main__":
    main()
