"""Benchmark 4: SNGAN discriminators on Fashion-MNIST at 32 px: sn vs SVDP-C vs STTP-C vs STTP-R.

Same generator (dense), same data, seeds, schedule and budget for every discriminator; only
D's parameterization changes. Per method it prints:

* Z of D: of the paper's 32 px discriminator (width 128, rank 64) with 3 input channels
  (CIFAR-10, what the paper's 51.74 / 16.71 / 18.33 refer to) and with 1 channel (the
  Fashion-MNIST D: the first conv and its shortcut shrink), and of the D actually trained
  (``--width`` scales every width, the rank scales with it, so Z stays that of the paper);
* FID and the IS analogue of the offline extractor: a classifier trained by sttpfast on
  Fashion-MNIST (``sttpfast.gan.extractor``). These are not Inception numbers and compare
  only with numbers made by the same extractor file, so they carry its name;
* seconds per iteration (1 G step + n_dis D steps) over the run and its ratio to sn
  (runs are sequential: the ratio is of medians over each run's iterations), and the ratio
  of D's own training step (forward + backward + Adam on reals and fakes) timed interleaved,
  A B C D A B C D ..., which is fair on a shared machine;
* a plot (``OUT/sigma_max.png``) of the largest ``sigma_max`` over D's layers during
  training, per method (mean over seeds), next to the layers' median stable rank.

    # README's CPU budget (2 shared cores: one torch thread avoids OpenMP threads waiting
    # for each other's time slices; about 25 minutes, most of it the extractor)
    python bench/gan.py --width 0.25 --bs 16 --steps 150 --seeds 0 --subset 6000 \
        --metrics-samples 1000 --extractor-steps 300 --timing-repeats 5 --threads 1
    # the paper's widths, rank 64 and batch (not run here: no GPU was lent to this work)
    python bench/gan.py --width 1 --bs 64 --steps 20000 --seeds 0 1 2 --metrics-samples 10000

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (or --data-dir).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from fastai.callback.core import Callback, CancelValidException

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, machine, markdown_table, ratio_stats  # noqa: E402

import sttpfast  # noqa: E402,F401  (registers the SNGAN models)
from sttpfast.callbacks._util import spectral_layers  # noqa: E402
from sttpfast.data import get_dls  # noqa: E402
from sttpfast.gan import GANMetrics, gan_learner  # noqa: E402
from sttpfast.gan.extractor import register_offline_extractor, train_offline_extractor  # noqa: E402
from sttpfast.gan.losses import gan_loss  # noqa: E402
from sttpfast.surgery import parameterize  # noqa: E402

METHODS = ("sn", "svdp-c", "sttp-c", "sttp-r")
#: the paper's widths of the 32 px networks (FACTS.md) and its rank
D_WIDTH, G_WIDTH, PAPER_RANK = 128, 256, 64


class SkipValidation(Callback):
    """The bench measures samples, not D's validation loss: skip fastai's validation pass."""

    def before_validate(self):
        raise CancelValidException()


class IterationTimer(Callback):
    """Wall time of every training iteration (1 G step + n_dis D steps), seconds.
    Order -10: its ``after_batch`` runs before the metrics callback evaluates."""

    order = -10

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def before_batch(self):
        self._start = time.perf_counter()

    def after_batch(self):
        self.times.append(time.perf_counter() - self._start)


class SigmaMaxTrace(Callback):
    """Every ``every`` G steps: the largest ``sigma_max`` over D's layers and their median
    stable rank (``sum s^2 / max s^2``). D is read in eval mode, so reading never advances
    spectral norm's power iteration (it would in training mode)."""

    order = -5

    def __init__(self, every: int):
        super().__init__()
        self.every, self.steps, self.sigma_max, self.stable_rank = every, [], [], []

    def before_fit(self):
        self.record(0)

    def after_batch(self):
        step = int(self.learn.train_iter)
        if step % self.every == 0:
            self.record(step)

    @torch.no_grad()
    def record(self, step: int) -> None:
        d = self.learn.model.discriminator
        was_training = d.training
        d.eval()
        try:
            spectra = [fn() for _, _, _, fn in spectral_layers(d)]
        finally:
            d.train(was_training)
        self.steps.append(step)
        self.sigma_max.append(max(float(s.max()) for s in spectra))
        self.stable_rank.append(statistics.median(float((s * s).sum() / s.max() ** 2) for s in spectra))


def widths(width: float) -> tuple[dict, dict]:
    """``(g_kwargs, d_kwargs)`` of the 32 px networks with every width scaled by ``width``."""
    g, d = max(1, round(G_WIDTH * width)), max(1, round(D_WIDTH * width))
    return dict(widths=(g,) * 4), dict(widths=(d,) * 4)


def paper_z(param: str, in_chans: int) -> float:
    """Z (%) of the paper's 32 px discriminator (width 128, rank 64) under ``param``."""
    rank = None if param == "sn" else PAPER_RANK
    return parameterize(timm.create_model("sngan_d32", in_chans=in_chans), param, rank=rank).z


def d_step_ratios(methods, rank: int, d_kwargs: dict, bs: int, repeats: int) -> dict[str, tuple]:
    """Per method: D's training step time over sn's (median, min, max of paired repeats).

    One step = forward of ``2 * bs`` images (reals and fakes, as the learner does), hinge
    loss, backward, Adam; timed interleaved across methods."""
    torch.manual_seed(0)
    x = torch.randn(2 * bs, 1, 32, 32)
    hinge = gan_loss("hinge")
    steps = {}
    for param in methods:
        d = timm.create_model("sngan_d32", in_chans=1, **d_kwargs)
        parameterize(d, param, rank=None if param == "sn" else rank)
        opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=2e-4, betas=(0.0, 0.9))

        def step(d=d, opt=opt):
            real, fake = d(x).split(bs)
            opt.zero_grad(set_to_none=True)
            hinge.discriminator(real, fake).backward()
            opt.step()
        steps[param] = step
    times = interleaved(steps, repeats=repeats, warmup=2)
    return {p: ratio_stats(times[p], times[methods[0]]) for p in methods}


def train_one(dls, param: str, seed: int, rank: int, args, extractor: Path) -> dict:
    """Train one GAN; returns its metrics, Z, iteration times and sigma_max trace."""
    g_kwargs, d_kwargs = widths(args.width)
    metrics = GANMetrics(every=args.steps, samples=args.metrics_samples, metrics=("fid", "isc"),
                         extractor=str(extractor), grid=64, seed=0)
    timer, trace = IterationTimer(), SigmaMaxTrace(every=max(1, args.steps // args.trace_points))
    torch.manual_seed(seed)
    learn = gan_learner(dls, g="sngan_g32", d="sngan_d32", d_param=param, rank=None if param == "sn" else rank,
                        g_kwargs=g_kwargs, d_kwargs=d_kwargs, n_dis=args.n_dis, seed=seed, sv_every=10**9,
                        cbs=[metrics, timer, trace, SkipValidation()],
                        run_dir=Path(args.out) / f"{param}-seed{seed}")
    with learn.no_bar(), learn.no_logging():
        learn.fit(steps=args.steps)
    warm = timer.times[min(2, len(timer.times) - 1):]  # the first iterations include one-off set-up
    return dict(values=dict(metrics.values), z=learn.compression_d.z, sec=statistics.median(warm),
                trace=(trace.steps, trace.sigma_max, trace.stable_rank))


def save_plot(traces: dict[str, list], path: Path, title: str) -> None:
    """Max sigma_max over D's layers (left) and their median stable rank (right) vs G step,
    per method (mean over seeds), as a PNG (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_sigma, ax_rank = fig.subplots(1, 2)
    for param, runs in traces.items():
        steps = runs[0][0]
        sigma = [statistics.mean(r[1][i] for r in runs) for i in range(len(steps))]
        srank = [statistics.mean(r[2][i] for r in runs) for i in range(len(steps))]
        ax_sigma.plot(steps, sigma, label=param)
        ax_rank.plot(steps, srank, label=param)
    ax_sigma.set(xlabel="G step", ylabel="max over D layers of sigma_max", title="D's sigma_max")
    ax_rank.set(xlabel="G step", ylabel="median over D layers of stable rank", title="D's stable rank")
    ax_sigma.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="D parameterizations (first: the baseline)")
    ap.add_argument("--steps", type=int, default=300, help="G steps per run (each with n_dis D steps)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--width", type=float, default=0.5, help="scale of every width (1: the paper's D 128, G 256)")
    ap.add_argument("--rank", type=int, default=None, help="rank of D's layers (default 64 * width: the paper's Z)")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--subset", type=int, default=0, help="training (and test) images kept (0: all 60k / 10k)")
    ap.add_argument("--n-dis", type=int, default=5)
    ap.add_argument("--metrics-samples", type=int, default=2000, help="generated (and real) images per FID / IS")
    ap.add_argument("--extractor-steps", type=int, default=300, help="training steps of the offline classifier")
    ap.add_argument("--timing-repeats", type=int, default=10, help="interleaved repeats of the D-step timing")
    ap.add_argument("--trace-points", type=int, default=30, help="sigma_max readings per run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/bench_gan", help="folder for runs, the extractor and the plot")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = args.rank if args.rank is not None else max(1, round(PAPER_RANK * args.width))
    out = Path(args.out)
    dls = get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs, subset=args.subset or None, augment=False,
                  seed=0)

    # one extractor for every run: FID values compare only under the same extractor file
    extractor = train_offline_extractor(dls, out / "extractor.safetensors", steps=args.extractor_steps, seed=0)
    name = register_offline_extractor(extractor)
    from sttpfast.gan.extractor import read_extractor_metadata
    accuracy = float(read_extractor_metadata(extractor)["valid_accuracy"])
    print(f"extractor {name}: test accuracy {100 * accuracy:.2f}%", file=sys.stderr, flush=True)

    _, d_kwargs = widths(args.width)
    d_step = d_step_ratios(args.methods, rank, d_kwargs, args.bs, args.timing_repeats)
    results = {}
    for param in args.methods:
        for seed in args.seeds:
            results[(param, seed)] = r = train_one(dls, param, seed, rank, args, extractor)
            print(f"{param} seed {seed}: {r['values']} Z {r['z']:.2f} {r['sec']:.3f} s/it", file=sys.stderr, flush=True)

    base_sec = statistics.median(results[(args.methods[0], s)]["sec"] for s in args.seeds)
    fid_key, isc_key = f"fid_{name}", f"isc_{name}"

    def spread(xs, fmt):
        return f"{statistics.mean(xs):{fmt}}" + (f" +- {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else "")

    rows = []
    for param in args.methods:
        runs = [results[(param, s)] for s in args.seeds]
        sec = statistics.median(r["sec"] for r in runs)
        med, lo, hi = d_step[param]
        rows.append([param, f"{paper_z(param, 3):.2f}", f"{paper_z(param, 1):.2f}", f"{runs[0]['z']:.2f}",
                     spread([r["values"][fid_key] for r in runs], ".2f"),
                     spread([r["values"][isc_key] for r in runs], ".3f"),
                     f"{sec:.3f}", f"{sec / base_sec:.2f}", f"{med:.2f} ({lo:.2f}-{hi:.2f})"])
    g_kwargs, _ = widths(args.width)
    n_train = len(dls.train.dataset)
    budget = (f"Fashion-MNIST {n_train} training images resized to 32 px, G widths {g_kwargs['widths'][0]} / D widths "
              f"{d_kwargs['widths'][0]} (x{args.width:g} of the paper's), D rank {rank}, batch {args.bs}, "
              f"{args.steps} G steps x {args.n_dis} D steps, Adam 2e-4 (0, 0.9) linear decay, hinge; "
              f"seeds {', '.join(map(str, args.seeds))} (mean +- sd); metrics on {args.metrics_samples} "
              f"generated vs {args.metrics_samples} real images with extractor {name} "
              f"({args.extractor_steps} steps, test accuracy {100 * accuracy:.2f}%); {machine()}")
    print(f"\n{budget}\n")
    print(markdown_table(
        ["D", "Z % paper D (3 ch)", "Z % paper D (1 ch)", "Z % trained D", f"FID({name})", f"IS({name})",
         "s / iteration", "ratio to sn (run)", "D step / sn (interleaved)"], rows))
    traces = {param: [results[(param, s)]["trace"] for s in args.seeds] for param in args.methods}
    plot = out / "sigma_max.png"
    save_plot(traces, plot, budget[:160] + "...")
    print(f"\nsigma_max plot: {plot}")


if __name__ == "__main__":
    main()
