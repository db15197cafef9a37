"""Metrics of a GAN: torch-fidelity plumbing (FID / KID / IS), the offline feature extractor
that sttpfast trains itself, and the GANMetrics callback inside a short GAN fit on digits."""
import json

import pytest
import torch
from fastai.callback.core import Callback

from sttpfast.data import get_dls
from sttpfast.gan import gan_learner
from sttpfast.gan.extractor import extractor_name, read_extractor_metadata, train_offline_extractor
from sttpfast.gan.metrics import INCEPTION_WEIGHTS_FILE, GANMetrics, fidelity_metrics, inception_weights, to_uint8_rgb

# Tiny networks as in test_gan.py: G makes 16 px digits, D is 8 wide.
TINY = dict(g_kwargs=dict(widths=(8, 8, 8, 8), bottom_width=2, z_dim=16), d_kwargs=dict(widths=(8, 8, 8, 8)))
TINY_CLASSIFIER = dict(base_width=4)


@pytest.fixture(scope="module")
def dls():
    return get_dls("digits", bs=32, augment=False, device="cpu")


@pytest.fixture(scope="module")
def extractor(dls, tmp_path_factory):
    """A tiny resnet20 (width 4) trained 80 steps on digits: the offline extractor file."""
    path = tmp_path_factory.mktemp("extractor") / "extractor.safetensors"
    return train_offline_extractor(dls, path, steps=80, model_kwargs=TINY_CLASSIFIER)


def digits_rgb(dls, n=300):
    """The first ``n`` training digits as uint8 (n, 3, 16, 16)."""
    return dls.train.dataset.x[:n].expand(-1, 3, -1, -1).contiguous()


def shifted(images, by=3):
    """The same images moved ``by`` pixels down and right (zeros enter): a different distribution."""
    out = torch.zeros_like(images)
    out[..., by:, by:] = images[..., :-by, :-by]
    return out


def offline_metrics(fakes, reals, path, metrics=("fid", "kid", "isc")):
    name = read_extractor_metadata(path)["name"]
    from sttpfast.gan.extractor import register_offline_extractor
    register_offline_extractor(path)
    return fidelity_metrics(fakes, reals, metrics, extractor=name, weights_path=path)


# ----------------------------------------------------------------------------------------
# the extractor and the plumbing
def test_extractor_file_records_its_name_and_accuracy_and_is_reused(dls, extractor):
    meta = read_extractor_metadata(extractor)
    assert meta["name"] == "sttpfast-resnet20-digits" == extractor_name("resnet20_cifar", "digits")
    assert (meta["num_classes"], meta["in_chans"], meta["image_size"], meta["steps"]) == (10, 1, 16, 80)
    assert meta["valid_accuracy"] > 0.5  # it learned the digits (chance is 0.1)
    before = extractor.stat().st_mtime_ns
    assert train_offline_extractor(dls, extractor, steps=80, model_kwargs=TINY_CLASSIFIER) == extractor
    assert extractor.stat().st_mtime_ns == before  # the cache: not trained again


def test_fid_and_kid_of_a_set_against_itself_are_zero_and_against_a_shifted_set_are_not(dls, extractor):
    reals = digits_rgb(dls, 600)
    same = offline_metrics(reals, reals, extractor, ("fid", "kid"))
    other = offline_metrics(shifted(reals), reals, extractor, ("fid", "kid"))
    assert abs(same["fid"]) < 1e-6
    assert other["fid"] > 10.0
    # KID's unbiased estimate of a set against itself is not exactly 0 (the identical pairs
    # sit in the cross term, not in the within-set terms: a bias of order 1/n), but tiny.
    assert other["kid"] > 10.0 and abs(same["kid"]) < 0.05 * other["kid"]
    # 600 images each: every KID subset (min(1000, N) images) is the whole set, so its spread is
    # zero by construction (it was reported as 4.6e-14): no kid_std then
    assert set(other) == {"fid", "kid"}


def test_inception_score_of_the_extractor_on_its_own_dataset_exceeds_one(dls, extractor):
    reals = digits_rgb(dls)
    isc = offline_metrics(reals, reals, extractor, ("isc",))["isc"]
    blank = offline_metrics(torch.zeros_like(reals), reals, extractor, ("isc",))["isc"]
    assert isc > 2.0            # confident and diverse class predictions on real digits
    assert abs(blank - 1.0) < 1e-6  # one image repeated: every split has KL 0


def test_images_in_minus_one_one_become_uint8_rgb():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    u = to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 5)
    assert u[0, :, 0].tolist() == [[0, 64, 128, 255, 255]] * 3


# ----------------------------------------------------------------------------------------
# bad input
def test_missing_inception_weights_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"^feature_extractor_weights_path: Inception weights file not found: .*nope\.pth$"):
        GANMetrics(every=1, samples=10, feature_extractor_weights_path=missing)
    with pytest.raises(ValueError, match="feature_extractor_weights_path") as err:
        inception_weights(None)  # no network here, so torch-fidelity's cache is empty
    assert INCEPTION_WEIGHTS_FILE in str(err.value) and "\n" not in str(err.value)


def test_a_weights_file_that_is_not_inceptions_is_refused_before_training(tmp_path):
    # only the file's existence was checked: a config file given as the weights failed at the
    # first metrics step, inside the progress bar, with "invalid literal for int()", after the
    # run folder was made
    text = tmp_path / "small.yml"
    text.write_text("gan:\n  g_kwargs: {widths: [32, 32]}\n")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    for path in (text, other):
        with pytest.raises(ValueError) as err:
            GANMetrics(every=1, samples=10, feature_extractor_weights_path=path)
        assert str(err.value).startswith(f"feature_extractor_weights_path: {path} is not InceptionV3 weights for "
                                         "torch-fidelity (")
    shaped = tmp_path / "pt_inception.pth"  # the names and head shape of torch-fidelity's file pass
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048)}, shaped)
    assert inception_weights(shaped) == shaped


@pytest.mark.parametrize("kwargs, message", [
    (dict(metrics=("fid", "lpips")), r"unknown metrics \['lpips'\]; allowed: isc, fid, kid"),
    (dict(metrics=("fid",), best_by="kid"), r"best_by 'kid' is not among the computed metrics \['fid'\]"),
    (dict(every=0), r"every must be a positive whole number of steps, got 0"),
    (dict(samples=1), r"samples must be at least 2, got 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GANMetrics(**{"extractor": "offline", **kwargs})


def test_offline_metric_names_differ_from_inception_names(extractor):
    offline = GANMetrics(every=1, samples=10, extractor=extractor)
    names = {offline.metric_name(m) for m in ("fid", "isc", "kid", "isc_std", "kid_std")}
    assert names == {"fid_sttpfast-resnet20-digits", "isc_sttpfast-resnet20-digits", "kid_sttpfast-resnet20-digits",
                     "isc_sttpfast-resnet20-digits_std", "kid_sttpfast-resnet20-digits_std"}
    assert not names & {"fid", "isc", "kid", "isc_std", "kid_std"}
    assert offline.best_name == "fid_sttpfast-resnet20-digits"


def test_the_plan_names_an_extractor_file_of_another_dataset(extractor):
    # a digits classifier measured a fashion_mnist run without a word: its numbers compare with
    # no fashion_mnist run measured by fashion_mnist's own extractor
    metrics = GANMetrics(every=5, samples=10, extractor=extractor)
    accuracy = read_extractor_metadata(extractor)["valid_accuracy"]
    assert metrics.plan(100, "fashion_mnist") == (
        f"metrics: fid, isc, kid every 5 G steps and at the end, 10 generated images against 10 real ones, extractor "
        f"{extractor} (sttpfast-resnet20-digits, {accuracy:.2%} on the validation split of digits; trained on digits, "
        "not on this run's fashion_mnist)")
    assert metrics.plan(100, "digits").endswith(
        f"extractor {extractor} (sttpfast-resnet20-digits, {accuracy:.2%} on the validation split of digits)")


# ----------------------------------------------------------------------------------------
# the callback in a GAN fit
class Scalars(Callback):
    """A logger (it defines log_scalars): records what the callbacks log, and is_best per step."""

    order = 80

    def __init__(self, metrics_cb):
        self.metrics_cb, self.rows, self.best_flags = metrics_cb, [], []

    def log_scalars(self, scalars, step):
        self.rows.append((step, dict(scalars)))

    def after_batch(self):
        if self.training:
            self.best_flags.append((int(self.learn.train_iter), self.metrics_cb.is_best))


def test_callback_evaluates_every_n_steps_in_a_gan_fit_and_writes_grid_and_values(dls, extractor, tmp_path):
    metrics = GANMetrics(every=2, samples=64, extractor=extractor, grid=16, at_end=True)
    log = Scalars(metrics)
    learn = gan_learner(dls, run_dir=tmp_path, d_param="sn", n_dis=1, ema_decay=0.9, cbs=[metrics, log], **TINY)
    with learn.no_bar(), learn.no_logging():
        learn.fit(steps=5)
    name = "fid_sttpfast-resnet20-digits"
    assert [h["step"] for h in metrics.history] == [2, 4, 5]  # every 2, then the last step
    # 64 samples against 64 reals: KID's one possible subset has no spread, so no kid _std
    assert all(set(h) == {"step", name, "isc_sttpfast-resnet20-digits", "isc_sttpfast-resnet20-digits_std",
                          "kid_sttpfast-resnet20-digits"} for h in metrics.history)
    fids = [h[name] for h in metrics.history]
    assert all(f > 0 for f in fids)
    assert metrics.best == min(fids) and metrics.best_step == metrics.history[fids.index(min(fids))]["step"]
    # is_best is raised only in the after_batch of an evaluation that improved the best
    assert [s for s, flag in log.best_flags if flag][0] == 2
    assert all(not flag for s, flag in log.best_flags if s % 2)
    logged = [(step, row) for step, row in log.rows if f"metrics/{name}" in row]
    assert [step for step, _ in logged] == [2, 4, 5]
    assert [row[f"metrics/{name}"] for _, row in logged] == fids
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line[name]) for line in lines] == [(2, fids[0]), (4, fids[1]), (5, fids[2])]
    for step in (2, 4, 5):
        png = tmp_path / "samples" / f"samples_{step:07d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(tmp_path / "samples" / "samples_0000005.png").size == (4 * 18 + 2, 4 * 18 + 2)  # 4x4 grid, pad 2


def test_offline_extractor_is_built_once_in_the_run_folder(dls, tmp_path):
    metrics = GANMetrics(every=1, samples=32, metrics=("fid",), extractor="offline", extractor_steps=20,
                         extractor_kwargs=TINY_CLASSIFIER, grid=4)
    learn = gan_learner(dls, run_dir=tmp_path, d_param="sn", n_dis=1, cbs=[metrics], **TINY)
    with learn.no_bar(), learn.no_logging():
        learn.fit(steps=1)
    meta = read_extractor_metadata(tmp_path / "extractor.safetensors")
    assert (meta["name"], meta["steps"]) == ("sttpfast-resnet20-digits", 20)
    assert list(metrics.values) == ["fid_sttpfast-resnet20-digits"]
    assert (tmp_path / "samples" / "samples_0000001.png").is_file()


def test_training_the_offline_extractor_leaves_the_loaders_random_state_alone(tmp_path):
    """--extractor offline trains the extractor on the GAN's own loaders before the GAN starts:
    it used up their shuffling stream, so the GAN trained on other batches than the same
    run without metrics (188 of 253 checkpoint tensors differed at step 4)."""
    dls = get_dls("digits", bs=16, subset=64, augment=False, device="cpu")
    before = [dl.rng_state() for dl in (dls.train, dls.valid)]
    train_offline_extractor(dls, tmp_path / "x.safetensors", steps=2, model_kwargs=TINY_CLASSIFIER)
    after = [dl.rng_state() for dl in (dls.train, dls.valid)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(after, before) for k in a)


def test_the_extractor_file_gets_the_mode_of_the_runs_other_files(extractor):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(extractor.stat().st_mode) == 0o666 & ~mask  # it was 0600 (safetensors' own)
