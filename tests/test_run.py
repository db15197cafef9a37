"""The `train` run's contract: metric columns that line up for any step budget, resuming a
finished run, run folders created only for runs that start, Ctrl-C, the process count."""
import json
import re
from pathlib import Path

import torch
from fastai.callback.core import Callback

from sttpfast.checkpoint import load_parameterized
from sttpfast.config import build_config
from sttpfast.run import run_training


def _cfg(tmp_path, name, *overrides):
    cfg, _ = build_config(overrides=["data.name=digits", "data.bs=64", "data.subset=512", "param.name=sttp-r",
                                     "param.rank=4", "optim.schedule=linear", "log.logger=none",
                                     "log.progress=false", f"train.out={tmp_path}", f"train.name={name}",
                                     *overrides])
    return cfg


class KeepValidLoader(Callback):
    """Keeps the run's validation loader, to recompute its metrics afterwards."""

    def before_fit(self):
        self.valid = self.learn.dls.valid


def _accuracies(model, loader) -> tuple[float, float]:
    """(top-1, top-5) of ``model`` over ``loader``, counted exactly."""
    model.eval()
    top1 = top5 = n = 0
    with torch.no_grad():
        for x, y in loader:
            best = model(x).topk(5, dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(dim=1).sum())
            n += len(y)
    return top1 / n, top5 / n


def test_a_budget_ending_mid_epoch_keeps_metric_names_and_values_aligned(tmp_path):
    lines = []
    keep = KeepValidLoader()
    summary = run_training(_cfg(tmp_path, "mid", "optim.steps=10"), extra_cbs=[keep], echo=lines.append)
    assert summary["steps"] == 10  # 7 batches per epoch: the second epoch stops after 3

    model = load_parameterized(tmp_path / "mid/checkpoints/last/model.safetensors")
    top1, top5 = _accuracies(model, keep.valid)
    metrics = summary["metrics"]
    assert list(metrics) == ["train_loss", "valid_loss", "accuracy", "top5_accuracy"]
    assert abs(metrics["accuracy"] - top1) < 1e-6, (metrics, top1, top5)
    assert abs(metrics["top5_accuracy"] - top5) < 1e-6, (metrics, top1, top5)
    assert top5 > top1  # the two columns differ, so a swap cannot pass

    # the printed per-epoch table: every name followed by its own value
    last = [line for line in lines if line.startswith("epoch 1")][-1]
    shown = dict(re.findall(r"(\w+) (\S+)", last))
    assert shown["accuracy"] == f"{metrics['accuracy']:.4f}" and shown["top5_accuracy"] == f"{metrics['top5_accuracy']:.4f}"
    assert shown["train_loss"] == f"{metrics['train_loss']:.4f}" and shown["valid_loss"] == f"{metrics['valid_loss']:.4f}"

    # the best checkpoint was chosen by, and stores, real top-1 accuracy
    state = json.loads((tmp_path / "mid/checkpoints/best/state.json").read_text())
    best_top1, _ = _accuracies(load_parameterized(tmp_path / "mid/checkpoints/best/model.safetensors"), keep.valid)
    assert state["monitor"] == "accuracy" and abs(state["best"] - best_top1) < 1e-6, (state["best"], best_top1)
