"""The ``sttpfast`` command line (click).

Every bad input ends in one ``Error: ...`` line and exit status 2, never a traceback.
"""
from __future__ import annotations

import functools
import sys
import warnings

import click

__all__ = ["main", "CLIError"]


class CLIError(click.ClickException):
    """A usage problem: printed as one line, exit status 2."""

    exit_code = 2


def user_errors(fn):
    """Turn the library's ValueErrors (bad arguments, bad files) into CLIError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise CLIError(str(err)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sttpfast")
def main():
    """sttpfast: train compressed, spectrally controlled networks (STTP, SVDP and baselines)."""


def param_options(fn):
    """--param / --rank / --compression / --include / --exclude / --init, shared by commands."""
    from sttpfast.params import ALL_PARAMS

    options = [
        click.option("--param", "param", default="dense", show_default=True,
                     help=f"weight parameterization: {', '.join(ALL_PARAMS)}"),
        click.option("--rank", type=int, default=None, help="SVD rank r shared by all layers"),
        click.option("--compression", type=float, default=None, help="target Z in percent (instead of --rank)"),
        click.option("--include", multiple=True, help="glob of layer names to parameterize (repeatable)"),
        click.option("--exclude", multiple=True, help="glob of layer names to leave dense (repeatable)"),
        click.option("--init", type=click.Choice(["identity", "spectral"]), default=None,
                     help="factor initialization (default: identity for SVDP/STTP, spectral for lowrank)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.option("--arch", required=True, help="any timm model name or a registered sttpfast model")
@param_options
@click.option("--num-classes", type=int, default=None, help="classifier outputs (model default if unset)")
@click.option("--in-chans", type=int, default=None, help="input channels (model default if unset)")
@user_errors
def info(arch, param, rank, compression, include, exclude, init, num_classes, in_chans):
    """Per-layer table (rank, DOF) and the compression Z of ARCH under PARAM."""
    from sttpfast.surgery import parameterize

    from sttpfast.models import create_model

    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = parameterize(model, param, rank=rank, compression=compression,
                              include=list(include) or None, exclude=list(exclude) or None, init=init)
    click.echo(report.table())
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


# flag -> dotted config key; a flag left unset keeps the config files' value
_TRAIN_FLAGS = {
    "dataset": "data.name", "data_dir": "data.data_dir", "bs": "data.bs", "subset": "data.subset",
    "download": "data.download", "arch": "model.arch", "param": "param.name", "rank": "param.rank",
    "compression": "param.compression", "init": "param.init", "include": "param.include",
    "exclude": "param.exclude", "opt": "optim.opt", "lr": "optim.lr", "wd": "optim.wd",
    "schedule": "optim.schedule", "epochs": "optim.epochs", "steps": "optim.steps", "seed": "train.seed",
    "out": "train.out", "name": "train.name", "logger": "log.logger", "mixed_precision": "train.mixed_precision",
}


@main.command()
@click.argument("dataset", required=False)
@click.option("--arch", default=None, help="any timm model name or a registered sttpfast model")
@click.option("--param", default=None, help="weight parameterization (default dense)")
@click.option("--rank", type=int, default=None, help="SVD rank r shared by all layers")
@click.option("--compression", type=float, default=None, help="target Z in percent (instead of --rank)")
@click.option("--include", multiple=True, help="glob of layer names to parameterize (repeatable)")
@click.option("--exclude", multiple=True, help="glob of layer names to leave dense (repeatable)")
@click.option("--init", type=click.Choice(["identity", "spectral"]), default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--steps", type=int, default=None, help="total optimizer steps (instead of --epochs)")
@click.option("--bs", type=int, default=None, help="batch size per process")
@click.option("--lr", type=float, default=None)
@click.option("--wd", type=float, default=None, help="weight decay")
@click.option("--opt", type=click.Choice(["sgd", "adam"]), default=None)
@click.option("--schedule", type=click.Choice(["one_cycle", "linear", "cosine", "const"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--data-dir", default=None, help="where datasets live (default $STTPFAST_DATA or ~/data)")
@click.option("--download", is_flag=True, default=None, help="download a missing dataset")
@click.option("--subset", type=int, default=None, help="use N training images (quick runs)")
@click.option("--out", default=None, help="folder for run folders (default runs)")
@click.option("--name", default=None, help="run folder name")
@click.option("--logger", type=click.Choice(["tensorboard", "wandb", "none"]), default=None)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default=None)
@click.option("--resume", default=None, type=click.Path(), help="continue the run in this folder")
@click.option("--cfg", multiple=True, type=click.Path(), help="YAML config, repeatable (later wins)")
@click.option("--set", "overrides", multiple=True, help="dotted override, e.g. optim.lr=0.05 (repeatable)")
@user_errors
def train(resume, cfg, overrides, **flags):
    """Train a classifier: sttpfast train DATASET --arch ARCH --param PARAM [--rank R]."""
    from sttpfast.config import build_config
    from sttpfast.run import run_training

    explicit = {key: flags[name] for name, key in _TRAIN_FLAGS.items()
                if flags.get(name) is not None and flags.get(name) != ()}
    for key in ("param.include", "param.exclude"):
        if key in explicit:
            explicit[key] = list(explicit[key])
    if resume is not None:
        if explicit or cfg or overrides:
            raise CLIError("--resume continues with the run's own config.yaml; drop the other options")
        summary = run_training(resume=resume, echo=click.echo)
    else:
        config, _ = build_config(cfg, overrides, explicit)
        summary = run_training(config, echo=click.echo)
    _print_summary(summary)
    if summary.get("nan_step") is not None:
        click.echo(f"Error: the loss became non-finite at step {summary['nan_step']}; training stopped. "
                   f"The last good checkpoint is {summary['checkpoint']}", err=True)
        sys.exit(1)


def _print_summary(summary: dict) -> None:
    m = summary.get("metrics", {})
    acc = m.get("accuracy")
    parts = [f"accuracy {acc:.4f}" if acc is not None else "accuracy -"]
    if m.get("top5_accuracy") is not None:
        parts.append(f"top-5 {m['top5_accuracy']:.4f}")
    parts += [f"Z {summary['z_percent']:.2f}%", f"params {summary['params_compressed']:,} / {summary['params_dense']:,}",
              f"{summary['steps']} steps in {summary['seconds']:.1f} s", f"run {summary['run_dir']}"]
    click.echo("summary: " + " | ".join(parts))


if __name__ == "__main__":  # pragma: no cover
    main()
