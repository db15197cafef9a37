"""Compress a trained dense classifier in three phases: the code behind ``sttpfast compress``.

    sttpfast compress runs/dense_resnet20 --param tt --compression 10 --phases 0,1,2 --epochs 3

* phase 0 decomposes the dense checkpoint: ``parameterize(..., init="spectral")`` turns every
  trained weight into the method's factors (exact up to the truncation to the rank), then
  re-estimates the BatchNorm statistics behind the changed layers on a few training batches
  (:func:`recalibrate_batchnorm`: the teacher's normalize activations of other scales);
* phase 1 distils block by block: block ``i`` of the compressed student matches block ``i``
  of the dense teacher (the model's ``feature_chain()``) with MSE, blocks in order, the
  earlier blocks kept trainable (their outputs feed block ``i``);
* phase 2 fine-tunes end to end with the task loss, as an ordinary ``sttpfast train`` run
  (:func:`sttpfast.run.run_training`) whose config holds the per-layer ranks
  (``param.layer_ranks``): its checkpoint resumes with ``sttpfast train --resume`` and exports
  with ``sttpfast export``.

The output is a run folder (default: next to the dense run, ``NAME-PARAM``) with
``compress_report.json`` (accuracy and Z after every phase, phase 1's per-block MSE on the
held-out data before and after) and the same numbers under ``compress`` in summary.json.
Without phase 2 the folder holds the config and ``checkpoints/last/model.safetensors``
(``sttpfast export`` reads it; there is no training state to resume).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import torch
from fastai.callback.core import Callback
from torch import nn

from sttpfast.atomic import write_file
from sttpfast.callbacks._util import unwrap_model
from sttpfast.config import build_config, save_config
from sttpfast.params.layers import parameterized_layers

__all__ = ["PHASES", "parse_phases", "distillation_blocks", "block_mse", "distill_blocks", "compress_run", "LoadWeights",
           "recalibrate_batchnorm", "BN_BATCHES"]

PHASES = (0, 1, 2)


def parse_phases(phases) -> tuple[int, ...]:
    """``"0,1,2"`` / ``"0,2"`` / a sequence -> increasing phases that start with 0; else ValueError."""
    text = phases if isinstance(phases, str) else ",".join(map(str, phases))
    try:
        parsed = tuple(int(p) for p in text.split(","))
    except ValueError:
        parsed = None
    if (not parsed or any(p not in PHASES for p in parsed) or parsed[0] != 0
            or list(parsed) != sorted(set(parsed))):
        raise ValueError(f"--phases {text!r}: give increasing phases from 0, 1, 2 starting with 0 (the "
                         "decomposition), e.g. 0,1,2 or 0,2")
    return parsed


def distillation_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, block)]`` of the model's ``feature_chain()`` (stem, then the blocks), in order."""
    chain = getattr(model, "feature_chain", None)
    if chain is None:
        raise ValueError(f"{type(model).__name__} has no feature_chain(): phase 1 (block-wise distillation) "
                         "needs the model's blocks in order; leave phase 1 out (--phases 0,2)")
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(block)], block) for block in chain()]


def _capture(blocks, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs ``(B, C, H, W)`` of ``blocks`` during one forward of ``model`` on ``x``."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda mod, inp, out: outputs.append(out)) for _, block in blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@torch.no_grad()
def block_mse(student: nn.Module, teacher: nn.Module, loader) -> list[float]:
    """Mean squared error of every block's output, student vs teacher, over ``loader`` (eval mode)."""
    s_blocks, t_blocks = distillation_blocks(student), distillation_blocks(teacher)
    was = student.training
    student.eval()
    teacher.eval()
    sums, count = [0.0] * len(s_blocks), 0
    try:
        for x, _ in loader:
            for i, (s, t) in enumerate(zip(_capture(s_blocks, student, x), _capture(t_blocks, teacher, x))):
                sums[i] += float(nn.functional.mse_loss(s, t, reduction="sum")) / s[0].numel()
            count += len(x)
    finally:
        student.train(was)
    return [v / count for v in sums]


def _relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target) / target.square().mean().clamp_min(1e-12)


def _batches(loader):
    while True:  # as many passes as a block's budget needs
        yield from loader


def distill_blocks(student: nn.Module, teacher: nn.Module, loader, steps_per_block: int, lr: float = 1e-3,
                   echo=print) -> None:
    """Phase 1: for block ``i`` in order, ``steps_per_block`` Adam steps on
    ``sum_{j <= i} MSE(student block j, teacher block j) / mean(teacher block j ** 2)``.

    Block ``i``'s term is the new one; the earlier blocks stay trainable (they feed block ``i``)
    and keep their own terms, so matching block ``i`` does not undo them; each term is
    relative to its target's power, so deep blocks' larger activations do not drown the
    early ones. Later blocks get
    no gradient. Both networks run in eval mode: the student's normalization layers use their
    running statistics (the teacher's, or those phase 0 re-estimated; their affine parameters
    still train), so the targets and the student's outputs are computed the same way.

    The leading blocks with no parameterized layer (a stem left dense) are the teacher's own,
    exactly: they are not distilled and stay frozen, since training them while later blocks
    are matched could only move them away from the teacher."""
    s_blocks, t_blocks = distillation_blocks(student), distillation_blocks(teacher)
    exact = _exact_prefix(s_blocks)
    frozen = {id(p) for _, block in s_blocks[:exact] for p in block.parameters()}
    teacher.eval()
    was = student.training
    student.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad and id(p) not in frozen], lr=lr)
    batches = _batches(loader)
    try:
        for i, (name, _) in enumerate(s_blocks):
            if i < exact:
                echo(f"phase 1: block {i + 1}/{len(s_blocks)} {name}: the teacher's own (nothing compressed), kept")
                continue
            for _ in range(steps_per_block):
                x, _ = next(batches)
                with torch.no_grad():
                    targets = _capture(t_blocks[: i + 1], teacher, x)
                outs = _capture(s_blocks[: i + 1], student, x)
                loss = sum(_relative_mse(o, t) for o, t in zip(outs, targets))
                own = float(nn.functional.mse_loss(outs[-1].detach(), targets[-1]))  # as block_mse measures it
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            # block i's own MSE (the loss sums blocks 1..i, relative: it only grows block after block)
            echo(f"phase 1: block {i + 1}/{len(s_blocks)} {name}: MSE {own:.5f} on the last training batch")
    finally:
        student.train(was)


def _exact_prefix(blocks: list[tuple[str, nn.Module]]) -> int:
    """How many leading ``blocks`` hold no parameterized layer (so equal the teacher's)."""
    for i, (_, block) in enumerate(blocks):
        if next(parameterized_layers(block), None) is not None:
            return i
    return len(blocks)


#: training batches phase 0 re-estimates the student's normalization statistics on
BN_BATCHES = 20


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, batches: int = BN_BATCHES) -> int:
    """Re-estimate the running mean and variance of ``model``'s BatchNorm layers that run after
    its first parameterized layer, on the first ``batches`` batches ``(x, y)`` of ``loader``;
    returns how many layers were re-estimated.

    A decomposed layer changes the scale of what follows it, and the statistics the student
    inherited from the teacher then normalize the wrong activations. Each batch counts the same
    (the plain average of the batch means and unbiased variances, not momentum's running
    average). Only the re-estimated norms run in training mode (dropout and the rest stay in
    eval mode, as at inference); norms that run before any parameterized layer see the
    teacher's inputs and keep the teacher's statistics. The model ends in eval mode with its
    norms' momentum as it was.
    """
    norms = {id(m): m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    layers = {id(m) for _, m, _ in parameterized_layers(model)}
    if batches < 1 or not norms or not layers:
        return 0
    chosen, after_layer, momenta = {}, [False], {}

    def layer_runs(module, args):
        after_layer[0] = True

    def norm_runs(module, args):
        key = id(module)
        if key not in chosen:  # a norm's first call decides: after a changed layer or not
            chosen[key] = after_layer[0]
            if chosen[key]:
                momenta[key] = module.momentum
                module.reset_running_stats()
                module.momentum = None  # cumulative average
        module.train(chosen[key])

    hooks = [m.register_forward_pre_hook(layer_runs if id(m) in layers else norm_runs)
             for m in model.modules() if id(m) in norms or id(m) in layers]
    model.eval()
    try:
        for _, (x, _) in zip(range(batches), loader):
            after_layer[0] = False
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for key, momentum in momenta.items():
            norms[key].momentum = momentum
        model.eval()
    return len(momenta)


@torch.no_grad()
def _accuracy(model: nn.Module, loader) -> float:
    was = model.training
    model.eval()
    right = total = 0
    try:
        for x, y in loader:
            right += int((model(x).argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
    return right / total


#: what to do about a teacher whose last checkpoint is damaged (export's "--which best" is no option here)
DAMAGED_TEACHER = ("resume the run (sttpfast train --resume {run_dir}): it falls back to the newest complete "
                   "checkpoint and trains on from there")


def _dense_teacher(run_dir: Path) -> tuple[nn.Module, dict, str | None]:
    """The run's dense model (its ``last`` checkpoint), config, and a warning when that
    checkpoint stopped before the run's budget (None otherwise); ValueError for anything else."""
    from sttpfast.checkpoint import read_metadata
    from sttpfast.export import is_gan_run, load_run_model, run_checkpoint

    model_file = run_checkpoint(run_dir, "last", damaged_hint=DAMAGED_TEACHER.format(run_dir=run_dir))
    if is_gan_run(run_dir, "last"):
        raise ValueError(f"{run_dir} is a GAN run; compress starts from a classification run trained with "
                         "--param dense")
    spec = json.loads(read_metadata(model_file).get("sttpfast_spec", "{}"))
    if spec:
        params = sorted({entry["param"] for entry in spec.values()})
        raise ValueError(f"{run_dir}: the checkpoint is not a dense model ({len(spec)} layer(s) are "
                         f"{', '.join(params)}); compress starts from a run trained with --param dense")
    teacher, _, _ = load_run_model(run_dir, "last")
    cfg, _ = build_config([run_dir / "config.yaml"])
    return teacher.eval(), cfg, _unfinished(run_dir, cfg, model_file.parent / "state.json")


def _unfinished(run_dir: Path, cfg: dict, state_file: Path) -> str | None:
    """The warning for a teacher stopped before its budget (SIGTERM, Ctrl-C, a crash): it
    was compressed without a word."""
    from sttpfast.run import checkpoint_finished

    try:
        meta = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None  # verified by the manifest already; an older layout says nothing either way
    if checkpoint_finished(cfg, meta):
        return None
    o, step = cfg["optim"], meta.get("train_iter")
    where = (f"step {step} of its {o['steps']}" if o["steps"] is not None
             else f"step {step} (epoch {meta.get('epoch')} of its {o['epochs']})")
    return (f"the teacher {run_dir} stopped at {where}: compressing that checkpoint "
            f"(`sttpfast train --resume {run_dir}` trains it to the end first)")


def compression_method(param: str) -> str:
    """The canonical name of ``param``, a method that compresses (ValueError otherwise)."""
    from sttpfast.params import ALIASES, method, methods, resolve_param

    compressing = [n for n, m in methods().items() if m.compresses]
    names = ", ".join(compressing)
    try:
        param = resolve_param(param)
    except ValueError:  # the registry's list has dense and sn, which compress refuses
        taken = [*compressing, *(alias for alias, n in ALIASES.items() if n in compressing)]
        raise ValueError(f"unknown parameterization {param!r}; compress takes: {', '.join(taken)}") from None
    if not method(param).compresses:
        raise ValueError(f"{param} does not compress (it keeps every weight dense); compress with one of: {names}")
    return param


def _output_config(cfg: dict, student: nn.Module, param: str, out: Path, epochs: int, steps, lr) -> dict:
    """The compressed run's config: the dense run's data and model, the student's per-layer ranks."""
    from sttpfast.surgery import parameterization_spec

    new = copy.deepcopy(cfg)
    ranks = {name: entry["rank"] for name, entry in parameterization_spec(student).items()}
    new["param"].update(name=param, rank=None, compression=None, rank_scale=None, plan="shared",
                        layer_ranks=ranks, init="identity", include=[], exclude=[])
    new["optim"].update(epochs=epochs, steps=steps)
    if lr is not None:
        new["optim"]["lr"] = lr
    new["train"].update(out=str(out.parent), name=out.name)
    return new


def _check_phase_1(distill_steps, distill_lr) -> None:
    """Phase 1's budget: a positive number of steps (or None: one pass) and a positive lr."""
    if distill_steps is not None and (isinstance(distill_steps, bool) or not isinstance(distill_steps, int)
                                      or distill_steps < 1):
        raise ValueError(f"--distill-steps must be a positive integer, got {distill_steps!r}")
    if isinstance(distill_lr, bool) or not isinstance(distill_lr, (int, float)) or not 0 < distill_lr < math.inf:
        raise ValueError(f"distill_lr must be a positive number, got {distill_lr!r}")


class KeepPhases(Callback):
    """Writes the phases' results so far (``compress_report.json`` and ``compress`` in
    summary.json) into phase 2's run folder before its first step: an interrupted phase 2,
    resumed with ``sttpfast train --resume``, ends with every phase's result (the run fills
    in phase 2's, see :func:`sttpfast.run.run_training`)."""

    def __init__(self, result: dict):
        self.result = result

    def before_fit(self):
        from sttpfast.processes import is_main_rank
        from sttpfast.run import COMPRESS_REPORT

        folder = Path(self.learn.run_dir)
        if is_main_rank() and not (folder / "summary.json").exists():
            self.result["run_dir"] = str(folder)
            write_file(folder / COMPRESS_REPORT, json.dumps(self.result, indent=2))
            write_file(folder / "summary.json", json.dumps({"compress": self.result}, indent=2))


class LoadWeights(Callback):
    """Copies ``state`` (the distilled student's tensors) into the freshly built model before
    the first step of phase 2 (the run built it with the same per-layer ranks)."""

    order = -10

    def __init__(self, state: dict):
        self.state = state

    def before_fit(self):
        unwrap_model(self.learn.model).load_state_dict(self.state)


def compress_run(run_dir, param: str, rank=None, compression: float | None = None, plan: str | None = None,
                 phases=None, epochs: int | None = None, steps: int | None = None, distill_steps: int | None = None,
                 lr: float | None = None, distill_lr: float = 1e-3, out=None, unrepresentable: str | None = None,
                 include=None, exclude=None, keep_dense_if_no_gain: bool = True, bn_batches: int = BN_BATCHES,
                 echo=print, progress: dict | None = None) -> dict:
    """Run the phases on the dense run ``run_dir``; returns the report (also ``compress_report.json``).

    Args:
        param, rank, compression, plan, unrepresentable, include, exclude, keep_dense_if_no_gain:
            see :func:`sttpfast.parameterize` (a tuple rank fits one layer shape: select those
            layers with ``include`` / ``exclude``).
        phases: ``"0,1,2"``, ``"0,2"``...; 0 always comes first. None: all three, or ``0,2``
            where the model has no ``feature_chain()`` for phase 1 (timm's own models; said).
        epochs / steps: phase 2's budget, one of the two (default one epoch).
        distill_steps: phase 1's Adam steps per block (default: one pass over the training data).
        lr: phase 2's peak learning rate (default: the dense run's / 10); distill_lr: phase 1's.
        out: the output run folder (default ``RUN-PARAM`` next to ``run_dir``, numbered if taken).
        bn_batches: training batches phase 0 re-estimates the student's BatchNorm statistics on
            (:func:`recalibrate_batchnorm`); 0 keeps the teacher's.
        progress: a dict whose ``"stage"`` says where the run is (``start-up``, ``phase 0``,
            ``phase 1``, ``phase 2``, ``writing``): what a caller tells the user after Ctrl-C.
    Every check (run folder, dense checkpoint, phases, rank) comes before anything is written.
    """
    from sttpfast.config import ConfigError, coerce, named_by_flags
    from sttpfast.data import get_dls
    from sttpfast.learner import fit_dls_as_trained, say_init_cost
    from sttpfast.run import (COMPRESS_REPORT, check_output, prepare_run_dir, run_training, say_warnings,
                              saying_warnings)
    from sttpfast.surgery import check_rank_useful, compression_report, parameterize

    run_dir = Path(run_dir).expanduser()
    chosen = phases is None
    phases = parse_phases(PHASES if chosen else phases)
    param = compression_method(param)
    if out is not None and not str(out).strip():  # Path("") is the working directory: "--out  exists"
        raise ValueError("--out is empty; give the folder of the compressed run (without --out: RUN-PARAM next to "
                         "RUN)")
    if out is not None and Path(out).expanduser().exists():
        raise ValueError(f"--out {out} exists; give a new folder (without --out: RUN-PARAM next to RUN, "
                         "numbered if taken)")
    if epochs is not None and steps is not None:  # steps won silently, and the output config kept both
        raise ValueError("give either --epochs or --steps (phase 2's budget), not both")
    for phase, flags in ((2, (("--epochs", epochs), ("--steps", steps), ("--lr", lr))),
                         (1, (("--distill-steps", distill_steps),))):
        given = [flag for flag, value in flags if value is not None]
        if given and phase not in phases:  # they did nothing, without a word
            raise ValueError(f"{', '.join(given)} set{'s' * (len(given) == 1)} phase {phase}, which --phases "
                             f"{','.join(map(str, phases))} leaves out: add {phase} to --phases, or leave "
                             f"{'it' if len(given) == 1 else 'them'} out")
    epochs = 1 if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {epochs!r}")
    try:  # phase 2's: the checks of `train`, named by compress's flags as its other checks are
        lr = None if lr is None else coerce("optim.lr", lr)
        steps = None if steps is None else coerce("optim.steps", steps)
    except ConfigError as err:
        raise ConfigError(named_by_flags(str(err), {"optim.lr": "--lr", "optim.steps": "--steps"})) from None
    _check_phase_1(distill_steps, distill_lr)
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"--bn-batches must be an integer >= 0 (0 keeps the teacher's statistics), got {bn_batches!r}")
    out = Path(out).expanduser() if out is not None else run_dir.parent / f"{run_dir.name}-{param}"
    check_output({"train": {"out": str(out.parent), "name": out.name}})  # before any work, not after
    progress = progress if progress is not None else {}
    progress["stage"] = "start-up"
    teacher, cfg, unfinished = _dense_teacher(run_dir)
    if unfinished is not None:
        echo(f"warning: {unfinished}")
    if chosen and getattr(teacher, "feature_chain", None) is None:
        phases = (0, 2)
        echo(f"phases 0,2: phase 1 (block-wise distillation) needs the model's blocks in order (feature_chain(), "
             f"which sttpfast's own architectures have); {type(teacher).__name__} has none")
    if 1 in phases:
        distillation_blocks(teacher)
    student = copy.deepcopy(teacher)
    say_init_cost(param, "spectral", echo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = parameterize(student, param, rank=rank, compression=compression, plan=plan, init="spectral",
                              unrepresentable=unrepresentable, include=include, exclude=exclude,
                              keep_dense_if_no_gain=keep_dense_if_no_gain)
    if not report.rows and report.left_dense:  # it wrote a "compressed" run at Z 100% after a warning
        raise ValueError(f"{param} at Z {compression:g}% leaves every selected layer dense (it gains nothing on them "
                         "at the rank that target gives): nothing to compress; give a smaller --compression, or "
                         "--no-keep-dense-if-no-gain")
    check_rank_useful(param, rank, report)
    say_warnings(caught, echo)
    if report.plan:
        echo(report.plan_table())
    if report.left_dense:
        echo(report.left_dense_table())
    new_cfg = _output_config(cfg, student, param, out, epochs, steps,
                             lr if lr is not None else cfg["optim"]["lr"] / 10)
    d = cfg["data"]
    with saying_warnings(echo):
        dls = get_dls(d["name"], data_dir=d["data_dir"], bs=d["bs"], subset=d["subset"], download=d["download"],
                      num_workers=d["num_workers"], seed=cfg["train"]["seed"], augment=d["augment"])
    # the images the teacher was trained on: its run's --img-size, or the resize training chose
    fit_dls_as_trained(dls, cfg["model"]["arch"], d.get("img_size"), cfg["model"]["kwargs"])
    dense_z = compression_report(teacher).z
    progress["stage"] = "phase 0"
    result = {"teacher": str(run_dir.resolve()), "param": param, "rank": report.rank, "plan": report.plan,
              "requested_phases": list(phases),
              "dense": {"accuracy": _accuracy(teacher, dls.valid), "z_percent": round(dense_z, 4)},
              "phases": {}}
    echo(f"dense: accuracy {result['dense']['accuracy']:.4f}")
    z = round(report.z, 4)
    inherited = _accuracy(student, dls.valid)
    used = min(bn_batches, len(dls.train)) if recalibrate_batchnorm(student, dls.train, bn_batches) else 0
    result["phases"]["0"] = {"accuracy": _accuracy(student, dls.valid) if used else inherited,
                             "accuracy_teacher_statistics": inherited, "bn_batches": used, "z_percent": z,
                             "left_dense": [row["layer"] for row in report.left_dense]}
    how = (f" (BatchNorm statistics re-estimated on {used} training batch{'' if used == 1 else 'es'}), with the teacher's normalization "
           f"statistics {inherited:.4f}" if used else "")
    echo(f"phase 0 (decomposed, {report.summary()}): accuracy {result['phases']['0']['accuracy']:.4f}{how}")
    if 1 in phases:
        progress["stage"] = "phase 1"
        before = block_mse(student, teacher, dls.valid)
        distill_blocks(student, teacher, dls.train, distill_steps or len(dls.train), distill_lr, echo)
        after = block_mse(student, teacher, dls.valid)
        names = [name for name, _ in distillation_blocks(student)]
        result["phases"]["1"] = {"accuracy": _accuracy(student, dls.valid), "z_percent": z,
                                 "block_mse_before": dict(zip(names, before)),
                                 "block_mse_after": dict(zip(names, after))}
        echo(f"phase 1 (block-wise distillation): accuracy {result['phases']['1']['accuracy']:.4f}")
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if 2 in phases:
        progress["stage"] = "phase 2"
        summary = run_training(new_cfg, extra_cbs=[LoadWeights(state), KeepPhases(result)], echo=echo)
        result = summary["compress"]  # with phase 2's result (also in compress_report.json)
        folder = Path(summary["run_dir"])
        progress["stage"] = "writing"
    else:
        from sttpfast.checkpoint import save_parameterized

        progress["stage"] = "writing"
        folder = prepare_run_dir(new_cfg)
        write_file(folder / "config.yaml", lambda path: save_config(new_cfg, path, "train"))
        (folder / "checkpoints" / "last").mkdir(parents=True, exist_ok=True)
        save_parameterized(student, folder / "checkpoints" / "last" / "model.safetensors")
        summary = {"run_dir": str(folder), "param": param, "rank": report.rank, "z_percent": z,
                   "metrics": {"accuracy": result["phases"][str(phases[-1])]["accuracy"]}}
        result["run_dir"] = str(folder)
        write_file(folder / COMPRESS_REPORT, json.dumps(result, indent=2))
        write_file(folder / "summary.json", json.dumps({**summary, "compress": result}, indent=2))
    if report.plan:
        write_file(folder / "rank_plan.json", json.dumps(report.plan, indent=2))
    last = result["phases"][str(phases[-1])]
    if last.get("nan_step") is None:  # else the command ends with the non-finite loss's message
        echo(f"compressed: accuracy {last['accuracy']:.4f} at Z {last['z_percent']:.2f}% (dense "
             f"{result['dense']['accuracy']:.4f}) in {folder}")
    return result
