"""The ``sttpfast`` command line (click).

Every bad input ends in one ``Error: ...`` line and exit status 2, never a traceback.
"""
from __future__ import annotations

import difflib
import functools
import warnings

import click

__all__ = ["main", "CLIError", "create_model"]


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


def create_model(arch: str, **kwargs):
    """``timm.create_model`` with sttpfast's architectures registered and a clear error
    (with close names) for an unknown one."""
    import timm

    import sttpfast.models  # noqa: F401  (registration)

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown architecture {arch!r}{hint}")
    return timm.create_model(arch, pretrained=False, **{k: v for k, v in kwargs.items() if v is not None})


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

    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = parameterize(model, param, rank=rank, compression=compression,
                              include=list(include) or None, exclude=list(exclude) or None, init=init)
    click.echo(report.table())
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
