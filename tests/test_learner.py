"""The Learner factory: fastai's schedules by step count, weights built once per validation
pass, and an ``export`` that refuses before writing anything."""
import pytest
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.schedule import combined_cos
from torch import nn
from torch.nn.utils import parametrize

from sttpfast.data import get_dls
from sttpfast.learner import fit, schedule_functions, spectral_learner
from sttpfast.surgery import parameterized_layers

STEPS_PER_EPOCH = 4  # 256 training images, bs 64


@pytest.fixture(scope="module")
def dls():
    return get_dls("digits", bs=64, subset=256, augment=False)


def tiny_net():
    """(B, 1, 16, 16) -> (B, 10); three layers that a spectral chain can parameterize."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


def _learner(dls, tmp_path, param="dense", cbs=(), **kwargs):
    return spectral_learner(dls, tiny_net(), param=param, rank=4 if param != "dense" else None, cbs=list(cbs),
                            run_dir=tmp_path, sv_every=1000, **kwargs)


class RecordHypers(Callback):
    """The lr and momentum the optimizer used at each training step."""

    order = 90

    def before_fit(self):
        self.lr_seen, self.mom_seen = [], []

    def after_batch(self):
        if self.training:
            self.lr_seen.append(self.opt.hypers[-1]["lr"])
            self.mom_seen.append(self.opt.hypers[-1]["mom"])


# ---------------------------------------------------------------------------------------
# schedules
def test_one_cycle_matches_fastais_fit_one_cycle_step_by_step(dls, tmp_path):
    ours, theirs = RecordHypers(), RecordHypers()
    fit(_learner(dls, tmp_path, cbs=[ours], opt="adam"), epochs=2, lr=0.01, schedule="one_cycle")
    _learner(dls, tmp_path, cbs=[theirs], opt="adam").fit_one_cycle(2, 0.01)
    assert len(ours.lr_seen) == len(theirs.lr_seen) == 2 * STEPS_PER_EPOCH
    # fastai sums 1/n per step where we divide: equal to float rounding
    assert ours.lr_seen == pytest.approx(theirs.lr_seen, rel=1e-12, abs=0)
    assert ours.mom_seen == pytest.approx(theirs.mom_seen, rel=1e-12, abs=0)


def test_one_cycle_ends_at_fastais_lr_over_1e5_and_a_step_budget_follows_it(dls, tmp_path):
    lr = 0.01
    reference = combined_cos(0.25, lr / 25.0, lr, lr / 1e5)  # fit_one_cycle's defaults
    f = schedule_functions("one_cycle", lr)["lr"]
    for pos in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert f(pos) == reference(pos)
    assert f(1.0) == pytest.approx(lr / 1e5, rel=1e-12) and f(0.0) == pytest.approx(lr / 25, rel=1e-12)

    rec = RecordHypers()
    fit(_learner(dls, tmp_path, cbs=[rec]), lr=lr, steps=6, schedule="one_cycle")  # ends mid-epoch 2
    assert rec.lr_seen == [reference(i / 6) for i in range(6)]


@pytest.mark.parametrize("kind", ["linear", "cosine", "const"])
def test_linear_cosine_const_schedules_by_step(dls, tmp_path, kind):
    lr, rec = 0.05, RecordHypers()
    fit(_learner(dls, tmp_path, cbs=[rec]), lr=lr, steps=6, schedule=kind)
    import math
    expected = {"linear": [lr * (1 - i / 6) for i in range(6)],
                "cosine": [lr * (1 + math.cos(math.pi * i / 6)) / 2 for i in range(6)],
                "const": [lr] * 6}[kind]
    assert rec.lr_seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert len(set(rec.lr_seen)) == (1 if kind == "const" else 6)


def test_unknown_schedule_is_refused(dls, tmp_path):
    with pytest.raises(ValueError, match="unknown schedule 'warmup'"):
        fit(_learner(dls, tmp_path), epochs=1, schedule="warmup")


# ---------------------------------------------------------------------------------------
# weights built once per validation pass
class CountBuilds(Callback):
    """Counts calls of every parametrization's forward, per phase of each epoch."""

    order = 95

    def before_fit(self):
        self.counts = []  # one dict per (epoch, phase): {layer name: builds}
        self.handles = []
        self.phase = None
        for name, _, p in parameterized_layers(self.learn.model):
            p.forward_mode = "materialized"  # what is counted is W's builds (a factorized call builds no W)
            self.handles.append(p.register_forward_hook(lambda *a, name=name: self._count(name)))
        self.valid_batches = 0

    def _count(self, name):
        self.counts[-1][name] = self.counts[-1].get(name, 0) + 1

    def before_train(self):
        self.counts.append({})

    def before_validate(self):
        self.counts.append({})
        self.valid_batches = 0

    def after_batch(self):
        if not self.training:
            self.valid_batches += 1

    def after_fit(self):
        for h in self.handles:
            h.remove()


def test_validation_builds_each_weight_once_and_training_gets_fresh_weights(dls, tmp_path):
    counter = CountBuilds()
    learn = _learner(dls, tmp_path, param="sttp-r", cbs=[counter])
    names = [name for name, _, _ in parameterized_layers(learn.model)]
    assert len(names) == 3
    fit(learn, epochs=2, lr=0.05, schedule="const")
    train1, valid1, train2, valid2 = counter.counts
    assert counter.valid_batches >= 2
    assert valid1 == valid2 == {name: 1 for name in names}
    # every training step rebuilds every weight, also after a validation pass
    assert train1 == train2 == {name: STEPS_PER_EPOCH for name in names}
    assert parametrize._cache_enabled == 0
    losses = [float(v) for v in learn.recorder.losses]
    assert len(set(losses)) == len(losses)  # every step trained


class FailInValidation(Callback):
    def __init__(self, exc):
        self.exc = exc

    def after_batch(self):
        if not self.training:
            raise self.exc


def test_an_interrupted_validation_never_leaves_cached_weights_for_training(dls, tmp_path):
    counter = CountBuilds()
    learn = _learner(dls, tmp_path, param="sttp-r", cbs=[counter, FailInValidation(CancelValidException())])
    fit(learn, epochs=2, lr=0.05, schedule="const")  # fastai cancels each validation pass
    assert counter.counts[2] == {name: STEPS_PER_EPOCH for name, _, _ in parameterized_layers(learn.model)}

    failing = FailInValidation(KeyboardInterrupt())
    learn = _learner(dls, tmp_path, param="sttp-r", cbs=[failing])
    with pytest.raises(KeyboardInterrupt):
        fit(learn, epochs=2, lr=0.05)  # escapes fastai: after_validate never runs
    assert parametrize._cache_enabled == 0
    layer = next(iter(parameterized_layers(learn.model)))[1]
    before = layer.weight.detach().clone()
    with torch.no_grad():
        for factor in layer.parameters():  # change the factors: the weight must follow
            factor.add_(0.1 * torch.randn_like(factor))
    assert not torch.equal(layer.weight, before)


# ---------------------------------------------------------------------------------------
def test_export_refuses_before_writing_anything(dls, tmp_path):
    learn = _learner(dls, tmp_path / "run", param="sttp-r")
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"export\('model.pkl'\).*sttpfast.save_parameterized"):
        learn.export("model.pkl")
    assert list((tmp_path / "run").iterdir()) == []
    assert learn.opt is None and len(learn.dls.train) == STEPS_PER_EPOCH  # nothing torn down


def test_a_bad_optimizer_is_refused_before_the_model_is_touched(dls):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="^unknown optimizer 'lamb'; allowed: sgd, adam$"):
        spectral_learner(dls, model, param="sttp-r", rank=2, opt="lamb")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_without_n_classes_on_the_loaders_the_metrics_follow_the_models_classes():
    """Loaders built by hand (no ``n_classes``): a 4-class timm model gets accuracy alone (top-5
    of 4 classes crashed in the first validation), a 10-class one top-5 as well."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(1, 8, 8, generator=g), int(i % 4)) for i in range(32)]
    loaders = DataLoaders(DataLoader(items, bs=8, shuffle=True), DataLoader(items, bs=8))
    import timm

    for classes, names in [(4, ["accuracy"]), (10, ["accuracy", "top5_accuracy"])]:
        model = timm.create_model("resnet20_cifar", num_classes=classes, in_chans=1)
        learn = spectral_learner(loaders, model, param="sttp-r", rank=2, sv_every=1000)
        assert [m.name for m in learn.metrics] == names
        if classes == 4:
            with learn.no_bar(), learn.no_logging():
                learn.fit(1, 1e-3)
            assert len(learn.recorder.values[-1]) == 3  # train_loss, valid_loss, accuracy


def test_a_callback_the_user_gives_replaces_the_default_of_its_type(dls):
    """README's example passes its own SingularValueLogger: it runs once, the user's."""
    from sttpfast.callbacks import SingularValueLogger

    mine = SingularValueLogger(every=7)
    learn = spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, cbs=[mine])
    loggers = [cb for cb in learn.cbs if isinstance(cb, SingularValueLogger)]
    assert loggers == [mine]


def test_a_callback_class_the_user_gives_replaces_the_default_of_its_type(dls):
    """fastai takes callback classes too: the defaults were kept beside them, so the D-optimal
    penalty ran twice (weight 2) without a word."""
    from sttpfast.callbacks import DOptimalPenalty, SingularValueLogger

    learn = spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, cbs=[SingularValueLogger, DOptimalPenalty])
    kinds = [type(cb) for cb in learn.cbs]
    assert kinds.count(SingularValueLogger) == 1 and kinds.count(DOptimalPenalty) == 1


def test_a_learner_without_a_run_folder_writes_nothing_into_the_current_directory(dls, tmp_path, monkeypatch):
    """README's first Python example (no run_dir) left singular_values.png in the current
    directory, from the default SingularValueLogger; its spectra stay in ``history``. With a
    run folder the heat map is drawn there, as in the apps."""
    from sttpfast.callbacks import SingularValueLogger

    monkeypatch.chdir(tmp_path)
    for run_dir in (None, tmp_path / "run"):
        learn = spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, run_dir=run_dir, sv_every=1)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
        [logger] = [cb for cb in learn.cbs if isinstance(cb, SingularValueLogger)]
        assert len({row["step"] for row in logger.history}) == len(dls.train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["singular_values.png"]


def test_a_model_the_user_parameterized_trains_as_it_is(dls):
    """README mixes methods by calling parameterize twice; spectral_learner's default
    param="dense" then refused the model ("already parameterized; densify the model first",
    which would undo the user's surgery). The model is taken as it is, with the callbacks
    its methods call for (each once)."""
    from sttpfast import compression_report, parameterize
    from sttpfast.callbacks import DOptimalPenalty, FrobeniusDecay, SingularValueLogger

    model = tiny_net()
    parameterize(model, "svdp-r", rank=4, include=["0"])
    parameterize(model, "lowrank", rank=4, include=["2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learn = spectral_learner(dls, model)
    assert learn.model is model and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert learn.compression.z == compression_report(model).z
    assert sorted(type(cb).__name__ for cb in learn.cbs if isinstance(cb, (DOptimalPenalty, FrobeniusDecay,
                                                                             SingularValueLogger))) == [
        "DOptimalPenalty", "FrobeniusDecay", "SingularValueLogger"]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    # a method on top of it parameterizes the other layers only when told which
    with pytest.raises(ValueError, match=r"^layer '0' is already parameterized \(svdp-r\): exclude it "
                                         r"\(exclude=\[\.\.\.\]\) to parameterize the others, or densify the model "
                                         r"first$"):
        spectral_learner(dls, model, param="tt", rank=2)
    learn = spectral_learner(dls, model, param="cp", rank=2, exclude=["0", "2"])
    assert [row.param for row in learn.compression.rows] == ["svdp-r", "lowrank", "cp"]
    assert {"DOptimalPenalty", "FrobeniusDecay", "SingularValueLogger"} <= {type(cb).__name__ for cb in learn.cbs}


def test_checkpointer_refuses_bad_settings_and_a_monitor_the_recorder_does_not_keep(dls, tmp_path):
    """Checkpointer(monitor="valid_los") trained to the end and never wrote `best`; mode
    "maximum" and every=0 were taken."""
    from sttpfast.callbacks.checkpoint import Checkpointer

    with pytest.raises(ValueError, match=r"^Checkpointer mode must be 'max' or 'min', got 'maximum'$"):
        Checkpointer(mode="maximum")
    with pytest.raises(ValueError, match=r"^Checkpointer every must be a positive whole number of steps, got 0$"):
        Checkpointer(every=0)
    learn = _learner(dls, tmp_path, cbs=[Checkpointer(monitor="valid_los", mode="min")])
    with pytest.raises(ValueError, match=r"Checkpointer monitor 'valid_los' is not a column of the recorder "
                                         r"\(train_loss, valid_loss, accuracy, top5_accuracy\); did you mean "
                                         r"'valid_loss'\?$"):
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
    assert not (tmp_path / "checkpoints").exists()
    # the default monitor (accuracy) on a learner without that metric: `last` alone, as before
    learn = _learner(dls, tmp_path / "plain", cbs=[Checkpointer()], metrics=[])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert (tmp_path / "plain" / "checkpoints" / "last").exists()
    assert not (tmp_path / "plain" / "checkpoints" / "best").exists()


def test_the_identity_init_over_pretrained_weights_is_said(dls, tmp_path):
    """SVDP/STTP's default identity init replaced every pretrained weight it parameterized
    without a word (init='spectral' converts them)."""
    import warnings

    import timm
    from safetensors.torch import save_file

    path = tmp_path / "r20.safetensors"
    save_file(timm.create_model("resnet20_cifar", num_classes=10, in_chans=1).state_dict(), str(path))
    with pytest.warns(UserWarning, match=r"^sttp-r's identity init replaces the pretrained weights of the 22 layers it "
                                         r"parameterizes; init='spectral' \(--init spectral\) converts them instead$"):
        spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, model_kwargs={"pretrained": str(path)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, init="spectral",
                         model_kwargs={"pretrained": str(path)})
        spectral_learner(dls, "resnet20_cifar", param="tt", rank=2, model_kwargs={"pretrained": str(path)})
        spectral_learner(dls, "resnet20_cifar", model_kwargs={"pretrained": str(path)})  # dense: nothing replaced
        spectral_learner(dls, "resnet20_cifar", param="sn", model_kwargs={"pretrained": str(path)})


def test_a_model_that_does_not_fit_the_data_is_refused_before_training(dls):
    """A model of another class count or input channels failed at the first step, in torch
    ("Target 9 is out of bounds", a conv shape error)."""
    import timm

    with pytest.raises(ValueError, match=r"^the model has 3 classes and the data 10: create it with num_classes=10 "
                                         r"\(or call model.reset_classifier\(10\)\)$"):
        spectral_learner(dls, timm.create_model("resnet20_cifar", num_classes=3, in_chans=1))
    with pytest.raises(ValueError, match=r"^the model takes 3 input channels \(its first layer 'stem.0'\) and the "
                                         r"data has 1: create it with in_chans=1$"):
        spectral_learner(dls, timm.create_model("resnet20_cifar", num_classes=10))


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=1.5), r"^steps must be a positive whole number, got 1.5$"),
    (dict(epochs=2.5), r"^epochs must be a positive whole number, got 2.5$"),
    (dict(epochs=True), r"^epochs must be a positive whole number, got True$")])
def test_fit_refuses_sizes_that_are_not_whole_numbers(dls, tmp_path, kwargs, message):
    learn = _learner(dls, tmp_path)
    with pytest.raises(ValueError, match=message):
        fit(learn, **kwargs)
