"""Export a trained model as a file that runs without sttpfast: plain safetensors or ONNX.

    from sttpfast.export import export_model, export_run, export_generator
    export_model(model, "net.onnx", "onnx", input_shape=(1, 3, 32, 32))   # any (parameterized) model
    export_run("train.out/digits-resnet20_cifar-sttp-r-r4-s0", "safetensors")  # what `sttpfast export` does
    export_generator(learn.model, "g.onnx", "onnx")                        # a GAN's G alone, input z

The model is first densified (:func:`sttpfast.densify`: each parameterized weight becomes the
plain tensor it stands for, same outputs), so what is written is an ordinary network:

* ``safetensors``: the dense state_dict; it loads with
  ``timm.create_model(arch, **model_args).load_state_dict(load_file(path), strict=True)``.
  The header's metadata holds ``architecture`` and ``model_args`` (JSON) for that call. For
  sttpfast's own architectures (``resnet20_cifar``, ``sngan_g32``...) ``import sttpfast.models``
  registers them in timm; no parameterization code is involved.
* ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter) of the dense model in eval
  mode, one input ``input`` whose first (batch) axis is dynamic, one output ``output``; a
  single self-contained file (no external data).

Files are written under a temporary name in the target folder and renamed into place, so a
failed export leaves nothing behind and never a half-written file.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from sttpfast.atomic import MANIFEST, unwritable_reason, verify_checkpoint, write_beside
from sttpfast.config import attention_rank_of, load_yaml
from sttpfast.surgery import densify, parameterized_layers

__all__ = ["FORMATS", "CHECKPOINTS", "export_model", "export_run", "export_generator", "run_checkpoint",
           "load_run_model", "load_gan_run_pair", "is_gan_run", "default_export_path"]

FORMATS = ("safetensors", "onnx")
CHECKPOINTS = ("last", "best")  # the checkpoints of a run folder that can be exported
INPUT_NAME, OUTPUT_NAME = "input", "output"


def _check_format(format: str) -> str:
    fmt = format.lower() if isinstance(format, str) else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; allowed: {', '.join(FORMATS)}")
    return fmt


def _check_out(path: str | os.PathLike, force: bool, fmt: str, run_dir: Path | None = None) -> Path:
    """Refuse an existing file without ``force`` (and with it, one that is not an earlier
    export of ``fmt``: ``--out RUN/config.yaml --force`` overwrote the run's config), a
    target that is a folder, a name that says another format (``--format onnx --out
    model.safetensors``: a mistake, or a file that every tool would open as the wrong
    format), a target inside ``run_dir``'s checkpoints, and one that cannot be written
    (found by trying, see :func:`~sttpfast.atomic.unwritable_reason`)."""
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file of that name
        raise ValueError(f"export target {path} names a folder; give a file name (e.g. {path}last.{fmt})")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"export target {path} is a folder; give a file name")
    named = path.suffix.lower().lstrip(".")
    if named in FORMATS and named != fmt:
        raise ValueError(f"export target {path} is named as {_article(named)} {named} file, but the format is {fmt}; "
                         f"name it {path.stem}.{fmt} or pass --format {named}")
    # the refusals --force cannot lift come first: "add --force" would then be refused again
    if path.exists() and named != fmt:
        raise ValueError(f"export target {path} exists and is not {_article(fmt)} {fmt} file: --force overwrites "
                         "only an earlier export of that format")
    if run_dir is not None and path.resolve().is_relative_to((run_dir / "checkpoints").resolve()):
        raise ValueError(f"export target {path} is inside the run's checkpoints folder {run_dir / 'checkpoints'}: "
                         f"export elsewhere (the default is {run_dir / 'export'})")
    if path.exists() and not force:
        raise ValueError(f"{path} exists; add --force (force=True in Python) to overwrite it")
    reason = unwritable_reason(path)
    if reason is not None:
        raise ValueError(f"cannot write export target {path}: {reason}")
    return path


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _architecture(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _write_atomically(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    return write_beside(path, write, suffix=f".tmp{path.suffix}")


def _dense_eval_copy(model: nn.Module) -> nn.Module:
    """A densified copy in eval mode; ``model`` itself is not touched (mode included).

    The copy is put in eval mode *before* densifying: a parametrization may compute its
    weight differently in training (spectral_norm runs a power iteration there and moves
    its vectors), and the file must hold the weight the model uses for inference."""
    dense = densify(copy.deepcopy(model).eval(), inplace=True)
    left = [name for name, _, _ in parameterized_layers(dense)]
    if left:  # densify removes every parametrization it knows; anything else would not export plainly
        raise ValueError(f"cannot densify layer(s) {', '.join(left[:5])}")
    return dense


def _save_safetensors(dense: nn.Module, tmp: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # clone: tied or view-sharing tensors would make save_file refuse the dict
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in dense.state_dict().items()}
    save_file(tensors, tmp, metadata=metadata)


def _check_onnx_installed() -> None:
    """torch.onnx's exporter needs onnx and onnxscript, which sttpfast does not require."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs the package(s) {', '.join(missing)}: pip install 'sttpfast[onnx]'")


def _save_onnx(dense: nn.Module, tmp: str, example: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    import warnings

    batch = torch.export.Dim("batch", min=1)
    if example.shape[0] < 2:
        # torch.export specializes axes of size 1: traced at batch 1, a model whose features
        # end 1x1 (a small input) ties the batch axis to them and refuses a dynamic batch
        example = example.expand(2, *example.shape[1:]).contiguous()
    with warnings.catch_warnings():
        # onnxscript's optimizer and torch.export announce internal details on every export
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    if metadata:
        import onnx

        proto = onnx.load(tmp)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)


def export_model(model: nn.Module, path: str | os.PathLike, format: str, input_shape: Sequence[int] | None = None,
                 model_args: dict | None = None, metadata: dict | None = None, force: bool = True) -> Path:
    """Densify ``model`` and write it to ``path`` as ``format`` (``safetensors`` or ``onnx``).

    Args:
        model: a timm model, parameterized by sttpfast or dense; left unchanged.
        path: the file to write (its folder is created).
        format: ``safetensors`` or ``onnx``.
        input_shape: ``(B, C, H, W)`` (or any shape whose first axis is the batch) of one
            example input; required for ONNX, where only the batch axis stays dynamic.
        model_args: keyword arguments that rebuild the architecture with ``timm.create_model``
            (``num_classes``, ``in_chans``...), stored in the safetensors metadata.
        metadata: extra string metadata for the safetensors header, or the ONNX file's
            ``metadata_props`` (values not str are JSON).
        force: overwrite an existing ``path``.
    Returns the path written. ValueError for an unknown format, a missing ``input_shape`` for
    ONNX, onnx / onnxscript not installed, or an existing ``path`` without ``force``; nothing
    is written then.
    """
    fmt = _check_format(format)
    path = _check_out(path, force, fmt)
    if fmt == "onnx":
        if input_shape is None or len(input_shape) < 1 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"ONNX export needs input_shape (B, C, H, W) with positive sizes, got {input_shape!r}")
        _check_onnx_installed()
    dense = _dense_eval_copy(model)
    if fmt == "safetensors":
        from sttpfast import __version__

        meta = {"format": "pt", "model_args": json.dumps(model_args or {}), "exported_by": f"sttpfast {__version__}"}
        if _architecture(model):
            meta["architecture"] = _architecture(model)
        meta.update(_as_strings(metadata))
        return _write_atomically(path, lambda tmp: _save_safetensors(dense, tmp, meta))
    param = next(iter(dense.parameters()), None)
    example = torch.randn(*map(int, input_shape), dtype=param.dtype if param is not None else torch.float32,
                          device=param.device if param is not None else "cpu")
    with torch.no_grad():
        return _write_atomically(path, lambda tmp: _save_onnx(dense, tmp, example, _as_strings(metadata)))


def _as_strings(metadata: dict | None) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()}


# ---------------------------------------------------------------------------------------
# GAN: the generator alone
#: the ``output`` metadata of an exported generator: how to read its images (as the metrics do)
GENERATOR_OUTPUT = ("float32 images (B, C, H, W) in [-1, 1] from z ~ N(0, 1) (B, z_dim); uint8 pixels: "
                    "round((y + 1) * 127.5) clipped to [0, 255]")

def export_generator(model: nn.Module, path: str | os.PathLike, format: str, ema: bool = False,
                     batch: int = 2, model_args: dict | None = None, force: bool = True) -> Path:
    """Export a GAN's generator alone: input ``z (B, z_dim)`` (ONNX name ``input``, batch axis
    dynamic), output images ``(B, C, H, W)`` in ``[-1, 1]``.

    Args:
        model: a :class:`sttpfast.gan.GANPair` (its ``generator``, or ``generator_ema`` with
            ``ema=True``) or a generator itself; it must have an integer ``z_dim``.
        ema: export the moving average of G kept by the learner (``generator_ema``).
        batch: the example batch traced for ONNX (any batch size runs afterwards).
        model_args: constructor arguments for the safetensors metadata (``widths``...), over
            the ``z_dim``, ``in_chans`` and ``bottom_width`` read from the generator.
    The metadata (safetensors header, ONNX ``metadata_props``) holds ``z_dim`` and ``output``
    (:data:`GENERATOR_OUTPUT`: the images' range and how to turn them into pixels).
    """
    generator = model
    if hasattr(model, "generator"):  # a GANPair: pick the network, do not export D
        generator = getattr(model, "generator_ema", None) if ema else model.generator
        if generator is None:
            raise ValueError("ema=True, but the model keeps no generator_ema (train with ema_decay)")
    elif ema:
        raise ValueError("ema=True needs a GANPair (the model with generator and generator_ema)")
    z_dim = getattr(generator, "z_dim", None)
    if not isinstance(z_dim, int) or z_dim < 1:
        raise ValueError(f"{type(generator).__name__} has no integer z_dim (latent size): not a generator")
    args = {"z_dim": z_dim}
    if hasattr(generator, "conv_out"):  # sttpfast's SNGAN generators: image channels, first map's side
        args["in_chans"] = int(generator.conv_out.out_channels)
    if isinstance(getattr(generator, "bottom_width", None), int):
        args["bottom_width"] = generator.bottom_width
    args.update(model_args or {})
    return export_model(generator, path, format, input_shape=(batch, z_dim), model_args=args,
                        metadata={"z_dim": str(z_dim), "output": GENERATOR_OUTPUT}, force=force)


# ---------------------------------------------------------------------------------------
# run folders
#: what `sttpfast export` can do about a damaged checkpoint
#: what a damaged checkpoint leaves the user where another one is complete
RESUME_HINT = "resume the run: it falls back to the newest complete checkpoint"
#: the files of a checkpoint that reading its model needs (the optimizer state is not one)
MODEL_FILES = ("model.safetensors", "state.json")


def _checkpoint_folder(root: Path, which: str) -> Path:
    """``checkpoints/<which>``: a folder, a link to one, or a one-line pointer file."""
    entry = root / which
    if entry.is_file():  # a pointer file: the checkpoint folder's name
        try:
            return root / entry.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return entry
    return entry  # a folder, or a symbolic link to one (followed by the file system)


def _damaged_hint(root: Path, folder: Path, which: str, resume_hint: str | None) -> str:
    """What the user can do about the damaged ``folder``: export the other of last / best
    where it is another, complete checkpoint; resume (``resume_hint``) where any other
    checkpoint is complete; else say that none is."""
    def complete(f: Path) -> bool:
        return (f / "model.safetensors").is_file() and (f / MANIFEST).is_file() and not verify_checkpoint(f)

    others = [f for f in root.iterdir() if f.is_dir() and f.name.startswith("ckpt-")
              and f.resolve() != folder.resolve() and complete(f)] if root.is_dir() else []
    if not others:
        return "no other checkpoint of the run is complete"
    other = "best" if which == "last" else "last"
    other_folder = _checkpoint_folder(root, other)
    hints = [f"export the {other} one (--which {other})"] if (
        resume_hint is None and other_folder.exists() and other_folder.resolve() != folder.resolve()
        and complete(other_folder)) else []
    return ", or ".join([*hints, resume_hint or RESUME_HINT])


def run_checkpoint(run_dir: str | os.PathLike, which: str = "last", damaged_hint: str | None = None) -> Path:
    """The model file of a run's ``which`` checkpoint (``last`` or ``best``).

    Accepts both checkpoint layouts: ``checkpoints/<which>/`` as a folder, or as a link /
    one-line pointer file naming a ``checkpoints/ckpt-STEP/`` folder. ValueError (naming the
    run) when ``run_dir`` is not a run folder or holds no such checkpoint, or when the
    model file or state is damaged (the message ends with what the user can do: the other
    checkpoint to export, or ``damaged_hint``, the resume the caller suggests, where another
    checkpoint is complete). A damaged optimizer state does not stop a reader of the model.
    """
    run_dir = Path(run_dir).expanduser()
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {which!r}; allowed: {', '.join(CHECKPOINTS)}")
    from sttpfast.run import run_folder_problem

    problem = run_folder_problem(run_dir)
    if problem is not None:
        raise ValueError(problem)
    root = run_dir / "checkpoints"
    folder = _checkpoint_folder(root, which)
    model_file = folder / "model.safetensors"
    if not model_file.is_file():
        raise ValueError(f"{run_dir} has no '{which}' checkpoint ({model_file} is missing)")
    if (folder / MANIFEST).is_file():  # sizes and hashes: a torn or flipped file, said as such
        problems = verify_checkpoint(folder.resolve(), only=MODEL_FILES)
        if problems:
            hint = _damaged_hint(root, folder, which, damaged_hint)
            raise ValueError(f"checkpoint {folder.resolve()} is damaged ({'; '.join(problems)}); {hint}")
    return model_file


def _run_config(run_dir: Path) -> dict:
    cfg = load_yaml(run_dir / "config.yaml")  # a ConfigError (a ValueError) of one line, as a resume says it
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if not model.get("arch") or not data.get("name"):
        raise ValueError(f"{run_dir / 'config.yaml'} names no model.arch / data.name")
    return cfg


def load_run_model(run_dir: str | os.PathLike, which: str = "last") -> tuple[nn.Module, dict, tuple[int, ...]]:
    """``(parameterized model, model_args, input_shape)`` of a classification run's checkpoint.

    The model is rebuilt as the run built it (``model.arch``, the dataset's classes and
    channels, ``model.kwargs``, built for the size the run trained at: the data's, ``--img-size``
    or the smallest a timm backbone accepts; its ``--attention`` form) and the checkpoint
    loaded into it; ``input_shape`` is ``(1, C, S, S)`` at that size.
    """
    from sttpfast.checkpoint import checkpoint_spec, load_parameterized
    from sttpfast.data import dataset_info
    from sttpfast.models.input_size import create_for_data

    run_dir = Path(run_dir).expanduser()
    model_file = run_checkpoint(run_dir, which)
    if _written_by_gan(model_file):
        raise ValueError(f"{run_dir} is a GAN run: load it with sttpfast.export.load_gan_run_pair")
    cfg = _run_config(run_dir)
    info = dataset_info(cfg["data"]["name"], cfg["data"].get("data_dir"))
    args = {"num_classes": info["n_classes"], "in_chans": info["in_chans"], **(cfg["model"].get("kwargs") or {})}
    args = {k: v for k, v in args.items() if v is not None}
    model, fitted = create_for_data(cfg["model"]["arch"], info["in_chans"], info["image_size"],
                                    img_size=cfg["data"].get("img_size"), **args)
    chans = args["in_chans"]
    if (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        args["img_size"] = fitted  # the position embedding's size: timm.create_model needs it too
    attention = cfg["param"].get("attention")
    if attention is not None:  # the structure the checkpoint's layers live in (q, k, v / the forms)
        from sttpfast.params.attention import parameterize_attention
        from sttpfast.surgery import apply_spec, parameterization_spec

        parameterize_attention(model, attention, rank=attention_rank_of(cfg["param"]))
        formed = parameterization_spec(model)  # qk-ov's forms: the other layers as the run had them
        apply_spec(model, {k: v for k, v in checkpoint_spec(model_file).items() if k not in formed})
    load_parameterized(model_file, model)
    return model, args, (1, chans, fitted, fitted)


def is_gan_run(run_dir: str | os.PathLike, which: str = "last") -> bool:
    """Whether the run's ``which`` checkpoint was written by the GAN app (``state.json``: ``"app": "gan"``)."""
    return _written_by_gan(run_checkpoint(run_dir, which))


def _written_by_gan(model_file: Path) -> bool:
    """:func:`is_gan_run` of a checkpoint already found (and verified) by :func:`run_checkpoint`:
    its ``state.json`` says the app, without hashing the model file again."""
    state = model_file.parent / "state.json"
    try:
        return json.loads(state.read_text()).get("app") == "gan"
    except (OSError, json.JSONDecodeError):
        return False


def load_gan_run_pair(run_dir: str | os.PathLike, which: str = "last") -> tuple[nn.Module, dict]:
    """``(GANPair, generator model_args)`` of a GAN run's checkpoint: G and D rebuilt as the run
    built them (``gan.g`` / ``gan.d`` with the dataset's channels and ``gan.g_kwargs`` /
    ``gan.d_kwargs``), the EMA copy of G when the checkpoint holds one, the checkpoint loaded."""
    from safetensors import SafetensorError, safe_open

    from sttpfast.checkpoint import load_parameterized
    from sttpfast.data import dataset_info
    from sttpfast.gan.learner import GANPair
    from sttpfast.models import create_model

    run_dir = Path(run_dir).expanduser()
    model_file = run_checkpoint(run_dir, which)
    if not _written_by_gan(model_file):  # it said "config.yaml names no gan.g / gan.d / data.name"
        raise ValueError(f"{run_dir} is not a GAN run: load it with sttpfast.export.load_run_model")
    cfg = load_yaml(run_dir / "config.yaml")
    gan, data = cfg.get("gan") or {}, cfg.get("data") or {}
    if not gan.get("g") or not gan.get("d") or not data.get("name"):
        raise ValueError(f"{run_dir / 'config.yaml'} names no gan.g / gan.d / data.name")
    in_chans = dataset_info(data["name"], data.get("data_dir"))["in_chans"]
    g_args = {"in_chans": in_chans, **(gan.get("g_kwargs") or {})}
    try:
        with safe_open(str(model_file), framework="pt") as f:
            has_ema = any(k.startswith("generator_ema.") for k in f.keys())
    except (SafetensorError, OSError) as err:  # a checkpoint without a manifest to check it
        raise ValueError(f"{model_file}: not a readable safetensors checkpoint ({err})") from None
    discriminator = create_model(gan["d"], in_chans=in_chans, **(gan.get("d_kwargs") or {}))
    ema = create_model(gan["g"], **g_args) if has_ema else None
    pair = GANPair(create_model(gan["g"], **g_args), discriminator, ema)
    load_parameterized(model_file, pair)
    return pair, g_args


def default_export_path(run_dir: str | os.PathLike, format: str, which: str = "last") -> Path:
    """Where ``sttpfast export`` writes without ``--out``: ``RUN/export/<which>.<format>``."""
    return Path(run_dir).expanduser() / "export" / f"{which}.{_check_format(format)}"


def export_run(run_dir: str | os.PathLike, format: str, out: str | os.PathLike | None = None, which: str = "last",
               force: bool = False) -> Path:
    """Export a run folder's ``which`` checkpoint (what ``sttpfast export`` does): a classifier
    whole, a GAN run's generator alone (its EMA copy when the run kept one; input ``z``).

    Every check (format, run folder, checkpoint, target) comes before anything is written.
    """
    fmt = _check_format(format)
    run_dir = Path(run_dir).expanduser()
    run_checkpoint(run_dir, which)  # not a run / no checkpoint: fail before the target is looked at
    path = _check_out(out if out is not None else default_export_path(run_dir, fmt, which), force, fmt, run_dir)
    if is_gan_run(run_dir, which):  # a GAN run exports its generator (the EMA copy when kept)
        pair, args = load_gan_run_pair(run_dir, which)
        return export_generator(pair, path, fmt, ema=pair.generator_ema is not None, model_args=args, force=force)
    model, args, input_shape = load_run_model(run_dir, which)
    metadata = {"checkpoint": which}
    normalization = _checkpoint_meta(run_dir, which).get("normalization")
    if normalization is not None:  # how to turn images into the model's input
        metadata["normalization"] = normalization
    return export_model(model, path, fmt, input_shape=input_shape, model_args=args, force=force, metadata=metadata)


def _checkpoint_meta(run_dir: Path, which: str) -> dict:
    """The ``which`` checkpoint's ``state.json`` ({} when unreadable: only extras come from it)."""
    try:
        return json.loads((run_checkpoint(run_dir, which).parent / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
