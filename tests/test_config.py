"""YAML configs merged in order, dotted overrides, unknown keys, presets."""
import warnings
from pathlib import Path

import pytest

from sttpfast.config import (CLI_FLAGS, DEFAULT_RANK, DEFAULTS, GAN_METRIC_KEYS, SCHEMA, ConfigError, ConfigWarning,
                             build_config, flatten, save_config)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_files_merge_in_order_with_a_warning_on_override(tmp_path):
    a = write(tmp_path, "a.yml", "optim:\n  lr: 0.2\n  epochs: 3\ndata:\n  bs: 32\n")
    b = write(tmp_path, "b.yml", "optim:\n  lr: 0.05\n")
    with pytest.warns(UserWarning, match=r"optim.lr: 0.2 from .*a.yml overridden by 0.05 from .*b.yml"):
        cfg, sources = build_config([a, b])
    assert cfg["optim"]["lr"] == 0.05 and cfg["optim"]["epochs"] == 3 and cfg["data"]["bs"] == 32
    assert sources["optim.lr"] == str(b)


def test_cli_then_dotted_overrides_win(tmp_path):
    a = write(tmp_path, "a.yml", "optim:\n  lr: 0.2\n")
    with pytest.warns(UserWarning, match=r"^config optim.lr: 0.3 from the command line overridden by 0.01 from --set$"):
        cfg, _ = build_config([a], overrides=["optim.lr=0.01", "param.include=[blocks.*, fc]"],
                              cli={"optim.lr": 0.3, "param.name": "sttp-r"})
    assert cfg["optim"]["lr"] == 0.01
    assert cfg["param"]["include"] == ["blocks.*", "fc"]


def _set_later(tmp_path, first, later, key, value):
    """build_config of the file ``first``, then ``key: value`` from a flag (``cli``), ``--set``
    (``set``) or a second file named after the key (``file``)."""
    if later == "cli":
        return build_config([first], cli={key: value})
    if later == "set":
        return build_config([first], overrides=[f"{key}={value}"])
    section, name = key.split(".")
    return build_config([first, write(tmp_path, f"{name}.yml", f"{section}:\n  {name}: {value}\n")])


@pytest.mark.parametrize("later", ["cli", "set", "file"])
def test_a_layer_size_given_later_replaces_an_earlier_sources(tmp_path, later):
    # `--cfg configs/demo.yml --compression 10` was refused ("give either param.rank or
    # --compression, not both"): the file's rank and the later flag are the run's one size
    demo = write(tmp_path, "demo.yml", "param:\n  name: sttp-r\n  rank: 8\n")
    with pytest.warns(ConfigWarning) as said:
        cfg, sources = _set_later(tmp_path, demo, later, "param.compression", 10)
    assert (cfg["param"]["rank"], cfg["param"]["compression"]) == (None, 10.0)
    by = {"cli": "the command line", "set": "--set", "file": str(tmp_path / "compression.yml")}[later]
    assert [str(w.message) for w in said if w.category is ConfigWarning] == [
        f"config param.rank: 8 from {demo} dropped: param.compression 10.0 sizes the layers from {by}"]
    # a rank scale over a file's compression
    z = write(tmp_path, "z10.yml", "param:\n  name: lowrank\n  compression: 10\n")
    with pytest.warns(ConfigWarning):
        cfg, _ = build_config([z], cli={"param.rank_scale": 0.25})
    assert (cfg["param"]["compression"], cfg["param"]["rank_scale"]) == (None, 0.25)
    # given by one source together, both are still refused
    with pytest.raises(ConfigError, match=r"^give either param.rank or param.compression, not both$"):
        build_config([demo], cli={"param.rank": 4, "param.compression": 10})
    both = write(tmp_path, "both.yml", "param:\n  rank: 4\n  compression: 10\n")
    with pytest.raises(ConfigError, match=r"^give either param.rank or param.compression, not both$"):
        build_config([both])


@pytest.mark.parametrize("later", ["cli", "set", "file"])
def test_epochs_given_later_replace_the_steps_of_an_earlier_source(tmp_path, later):
    # the paper's configs set optim.steps: 100000; `--cfg it --epochs 1` kept the 100,000 steps
    # (steps replace epochs whenever set) and started a run of days
    paper = write(tmp_path, "paper.yml", "optim:\n  steps: 100000\n")
    cfg, sources = _set_later(tmp_path, paper, later, "optim.epochs", 1)
    assert (cfg["optim"]["epochs"], cfg["optim"]["steps"]) == (1, None)
    assert sources["optim.steps"] == sources["optim.epochs"]
    # given together, both stay (steps replace epochs), flags and --set alike
    cfg, _ = build_config([paper], cli={"optim.epochs": 1, "optim.steps": 50})
    assert (cfg["optim"]["epochs"], cfg["optim"]["steps"]) == (1, 50)
    cfg, _ = build_config([paper], overrides=["optim.epochs=2"], cli={"optim.steps": 7})
    assert (cfg["optim"]["epochs"], cfg["optim"]["steps"]) == (2, 7)
    # the steps dropped are said (the CLI's warning line)
    with pytest.warns(ConfigWarning, match=r"^config optim.steps: 100000 from .*paper.yml dropped: optim.epochs 1 "
                                           r"is the budget from the command line$"):
        build_config([paper], cli={"optim.epochs": 1})
    # steps given later over a file's epochs: the epochs stay in the config but are not the
    # budget, which is said too (it was said only the other way round)
    epochs = write(tmp_path, "e.yml", "optim:\n  epochs: 2\n")
    with pytest.warns(ConfigWarning) as said:
        cfg, _ = build_config([epochs], cli={"optim.steps": 7})
    assert (cfg["optim"]["epochs"], cfg["optim"]["steps"]) == (2, 7)
    assert [str(w.message) for w in said] == [
        f"config optim.epochs: 2 from {epochs} is not the budget: optim.steps 7 from the command line is"]
    with pytest.warns(ConfigWarning, match=rf"^config optim.epochs: 2 from {epochs} is not the budget: optim.steps 5 "
                                           rf"from .*s.yml is$"):
        build_config([epochs, write(tmp_path, "s.yml", "optim:\n  steps: 5\n")])
    # a file whose steps were its budget already: its epochs never were, nothing to say
    both = write(tmp_path, "both.yml", "optim:\n  epochs: 3\n  steps: 50\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg, _ = build_config([both], cli={"optim.steps": 7})
    assert (cfg["optim"]["epochs"], cfg["optim"]["steps"]) == (3, 7)


def test_metrics_turned_off_later_drop_a_configs_metric_settings():
    # offline (no Inception weights) a user turns a paper config's metrics off: its
    # metrics_samples then refused the run ("has no effect without --metrics-every ... leave it
    # out", though the user never gave it), and null for it was refused as not an integer
    from sttpfast.gan.run import check_gan_config

    paper = ROOT / "configs/aistats21/table1_gan_reduced_discriminator/cifar10_sttp_c.yml"
    cfg, sources = build_config([paper])
    assert (cfg["gan"]["metrics_every"], cfg["gan"]["metrics_samples"]) == (5000, 50000)
    for how in ({"overrides": ["gan.metrics_every=null"]}, {"cli": {"gan.metrics_every": None}}):
        cfg, sources = build_config([paper], **how)
        assert cfg["gan"]["metrics_every"] is None
        assert {key: cfg["gan"][key.split(".")[1]] for key in GAN_METRIC_KEYS} == {
            key: DEFAULTS["gan"][key.split(".")[1]] for key in GAN_METRIC_KEYS}
        check_gan_config(cfg)  # no "no effect" refusal
    # given in the same command as metrics off, a metric setting is still refused
    cfg, _ = build_config([paper], overrides=["gan.metrics_every=null", "gan.metrics_samples=64"])
    with pytest.raises(ValueError, match=r"^--metrics-samples \(gan.metrics_samples\) has no effect without"):
        check_gan_config(cfg)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        build_config(overrides=["optim.lrr=0.1"])
    bad = write(tmp_path, "bad.yml", "optm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optm.lr' in .*bad.yml"):
        build_config([bad])


def test_a_section_given_a_value_is_said_to_be_a_section(tmp_path):
    # "unknown config key 'optim' ...; did you mean 'optim.wd'?": optim is a section, and the
    # suggestion was one of its keys at random
    scalar = write(tmp_path, "sect.yml", "optim: 3\n")
    with pytest.raises(ConfigError) as err:
        build_config([scalar])
    assert str(err.value) == (f"config optim in {scalar} is a section, not a value: give its keys as a mapping "
                              "(optim.opt and the others), or --set optim.KEY=VALUE")
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["param=3"])
    assert str(err.value).startswith("config param in --set is a section, not a value: ")


@pytest.mark.parametrize("pair,message", [
    ("optim.epochs=0", "config optim.epochs = 0: expected a positive integer (epochs >= 1)"),
    ("data.bs=-1", "config data.bs = -1: expected a positive integer"),
    ("optim.opt=rmsprop", "config optim.opt = 'rmsprop': expected 'sgd' or 'adam'"),
    ("log.logger=mlflow", "config log.logger = 'mlflow': expected 'tensorboard' or 'wandb' or 'none'"),
    ("optim.lr", "override 'optim.lr' must look like key=value (e.g. optim.lr=0.05)"),
    # wrong types: one message naming the key, the value and the type the schema wants
    ("optim.lr=abc", "config optim.lr = 'abc': expected a number"),
    ("param.name=[sttp]", "config param.name = ['sttp']: expected a string"),
    ("param.compression=abc", "config param.compression = 'abc': expected a number or null"),
    ("param.compression=150", "config param.compression = 150.0: expected a number in (0, 100] (percent of the dense size)"),
    ("data.bs=true", "config data.bs = True: expected an integer"),
    ("data.bs=2.5", "config data.bs = 2.5: expected an integer"),
    ("param.rank=0", "config param.rank = 0: expected a positive integer, a list of positive integers or 'full'"),
    ("param.rank=half", "config param.rank = 'half': expected an integer, a list of integers, 'full' or null"),
    ("param.rank=[4, x]", "config param.rank = [4, 'x']: expected an integer, a list of integers, 'full' or null"),
    ("param.include=[1, 2]", "config param.include = [1, 2]: expected a list of strings"),
    ("optim.lr.x=1", "unknown config key 'optim.lr.x' in --set; did you mean 'optim.lr'?"),
    ("param.name=sttpx", "config param.name: unknown parameterization 'sttpx'; did you mean 'sttp'? allowed: "),
    # YAML reads {depth:2} as the key 'depth:2' without a value: the model was built with its
    # defaults, without a word
    # numpy's "Seed must be between 0 and 2**32 - 1", naming no setting, after the run began
    ("train.seed=-1", "config train.seed = -1: expected an integer in [0, 2**32 - 1]"),
    ("train.seed=4294967296", "config train.seed = 4294967296: expected an integer in [0, 2**32 - 1]"),
    ("model.kwargs={depth:2,embed_dim:24}", "config model.kwargs = {'depth:2': None, 'embed_dim:24': None}: "
                                            "'depth:2' is a key without a value; YAML needs a space after the "
                                            "colon: {depth: 2}"),
])
def test_bad_values(pair, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[pair])
    assert str(err.value).startswith(message)


def test_values_are_coerced_to_the_schema_type():
    cfg, _ = build_config(overrides=["optim.lr=1", "param.name=sttp-r", "param.include=fc", "param.compression=5"])
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["param"]["include"] == ["fc"] and cfg["param"]["compression"] == 5.0


def test_the_schema_is_the_one_list_of_keys():
    assert list(flatten(DEFAULTS)) == list(SCHEMA)
    assert {k: v for k, v in DEFAULTS.items() if k not in ("param", "gan")} | {"param": None} == {  # gan: test_gan_app
        "data": {"name": "digits", "data_dir": None, "bs": 128, "subset": None, "download": False, "num_workers": 0,
                 "augment": True, "img_size": None},
        "model": {"arch": "resnet20_cifar", "kwargs": {}},
        "param": None,
        "optim": {"opt": "sgd", "lr": 0.1, "mom": 0.9, "wd": 5e-4, "schedule": "one_cycle", "epochs": 10, "steps": None},
        "reg": {"d_optimal": 1.0, "frobenius_decay": None, "spectral_bound": None},
        "log": {"logger": "tensorboard", "every": 10, "sv_every": 100, "wandb_project": "sttpfast", "progress": True},
        "train": {"seed": 0, "out": "runs", "name": None, "mixed_precision": "no", "checkpoint_every": None},
    }
    assert DEFAULTS["param"] == {"name": "dense", "rank": None, "compression": None, "init": None,
                                 "include": [], "exclude": [], "plan": "shared", "rank_scale": None,
                                 "unrepresentable": "skip", "layer_ranks": {},
                                 "attention": None, "attention_rank": None, "keep_dense_if_no_gain": True}
    assert set(CLI_FLAGS.values()) <= set(SCHEMA)


@pytest.mark.parametrize("sets,rank,source", [
    (["param.name=sttp"], DEFAULT_RANK, "default"),          # low rank without a size: compress
    (["param.name=svdp-c", "param.rank=8"], 8, "--set"),
    (["param.name=sttp-r", "param.rank=full"], None, "--set"),   # full rank, asked for explicitly
    (["param.name=lowrank", "param.compression=5"], None, None),
    (["param.name=dense"], None, None),                      # the baselines take no rank
    (["param.name=sn"], None, None),
])
def test_rank_default_and_full(sets, rank, source):
    cfg, sources = build_config(overrides=sets)
    assert DEFAULT_RANK == 32
    assert cfg["param"]["rank"] == rank and sources.get("param.rank") == source


def test_rank_with_a_baseline_is_an_error():
    with pytest.raises(ConfigError, match=r"^param.rank = 4: 'sn' takes no rank"):
        build_config(overrides=["param.name=sn", "param.rank=4"])


def test_full_and_default_rank_survive_a_save(tmp_path):
    full, _ = build_config(overrides=["param.name=sttp", "param.rank=full"])
    save_config(full, tmp_path / "full.yml")
    assert "rank: full" in (tmp_path / "full.yml").read_text()
    again, sources = build_config([tmp_path / "full.yml"])
    assert again == full and again["param"]["rank"] is None and "param.rank" in sources
    default, _ = build_config(overrides=["param.name=sttp"])
    again, _ = build_config([save_config(default, tmp_path / "default.yml")])
    assert again["param"]["rank"] == 32


def test_malformed_yaml(tmp_path):
    bad = write(tmp_path, "x.yml", "optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        build_config([bad])
    # one line (the parser's own message spans four, with its context)
    assert str(err.value) == f"config file {bad} is not valid YAML: line 3, column 1: expected ',' or ']', but got " \
                             "'<stream end>' (while parsing a flow sequence from line 2, column 7)"
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config([write(tmp_path, "y.yml", "- 1\n- 2\n")])
    # a binary file said only "'utf-8' codec can't decode byte 0xdc in position 26" (no file named)
    binary = tmp_path / "b.yml"
    binary.write_bytes(b"data:\n  name: digits\n  bs: \xdc\xff\n")
    with pytest.raises(ConfigError) as err:
        build_config([binary])
    assert str(err.value) == f"config file {binary} is not UTF-8 text (byte 0xdc at offset 27)"


def test_model_kwargs_are_free_form_and_config_round_trips(tmp_path):
    cfg, _ = build_config(overrides=["model.kwargs={drop_rate: 0.3}"])
    assert cfg["model"]["kwargs"] == {"drop_rate": 0.3}
    again, _ = build_config([save_config(cfg, tmp_path / "c.yml")])
    assert again == cfg


FIGURE7 = "configs/aistats21/figure7_classification"
# preset -> (dataset, arch, param, rank, lr, wd, epochs, steps, schedule, bs): the values each one must give
PRESETS = {
    "configs/env.yml": ("digits", "resnet20_cifar", "dense", None, 0.1, 5e-4, 10, None, "one_cycle", 128),
    "configs/demo.yml": ("digits", "resnet20_cifar", "sttp-r", 8, 0.05, 5e-4, 4, None, "one_cycle", 64),
    **{f"{FIGURE7}/{name}.yml": ("cifar10", "wrn28_10", param, rank, 0.1, 1e-4, 10, 100000, "linear", 128)
       for name, param, rank in [("dense", "dense", None)] + [
           (f"{kind}_r{r}", f"{kind}-r", r) for kind in ("sttp", "svdp") for r in (8, 16, 32, 64)]},
}


def test_the_preset_table_lists_every_preset():
    gan = "_gan_"  # configs/aistats21/table*_gan_*/: the GAN app's, checked in test_gan_app.py
    assert sorted(PRESETS) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yml")
                                     if gan not in p.parent.name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gives_its_values(preset):
    cfg, _ = build_config([ROOT / "configs/env.yml", ROOT / preset])
    d, p, o = cfg["data"], cfg["param"], cfg["optim"]
    assert (d["name"], cfg["model"]["arch"], p["name"], p["rank"], o["lr"], o["wd"], o["epochs"], o["steps"],
            o["schedule"], d["bs"]) == PRESETS[preset]
    assert (d["data_dir"], d["num_workers"], cfg["train"]["out"], cfg["log"]["logger"]) == \
        ("~/data", 0, "runs", "tensorboard")


def test_paper_preset_values():
    cfg, _ = build_config([ROOT / "configs/aistats21/figure7_classification/sttp_r32.yml"])
    assert (cfg["model"]["arch"], cfg["param"]["name"], cfg["param"]["rank"]) == ("wrn28_10", "sttp-r", 32)
    assert (cfg["optim"]["lr"], cfg["optim"]["wd"], cfg["optim"]["steps"], cfg["optim"]["schedule"]) == \
        (0.1, 1e-4, 100000, "linear")


def test_text_fields_keep_yaml_look_alikes_as_text():
    # YAML would read these as False / 1000.0; the schema says the fields hold text
    cfg, _ = build_config(overrides=["train.name=no", "train.mixed_precision=no", "data.name=digits"])
    assert cfg["train"]["name"] == "no" and cfg["train"]["mixed_precision"] == "no"
    cfg, _ = build_config(overrides=["train.name=1e3"])
    assert cfg["train"]["name"] == "1e3"
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config(overrides=["optim.lr=abc"])


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as the text '1e-3'; users write learning rates that way."""
    path = tmp_path / "c.yml"
    path.write_text("optim:\n  lr: 1e-3\n  wd: 5E-4\n")
    cfg, _ = build_config([path], ["train.seed=7"])
    assert cfg["optim"]["lr"] == 0.001 and cfg["optim"]["wd"] == 0.0005
    cfg, _ = build_config(overrides=["optim.lr=2e-4", "optim.wd=+1e2"])
    assert cfg["optim"]["lr"] == 0.0002 and cfg["optim"]["wd"] == 100.0
    cfg, _ = build_config(overrides=["train.name=1e3"])
    assert cfg["train"]["name"] == "1e3"  # a text field keeps the text


@pytest.mark.parametrize("sets,rank", [
    (["param.name=tt", "param.rank=[4, 8, 4]"], [4, 8, 4]),           # TT bonds
    (["param.name=tucker", "param.rank=[8, 6]"], [8, 6]),             # Tucker (R_out, R_in)
    (["param.name=ht", "param.rank=[[4, 8, 6], [3, 3, 3]]"], [[4, 8, 6], [3, 3, 3]]),  # an HT tree stays a tree: each layer checks its shape
    (["param.name=tt", "param.rank=5"], 5),                           # one int for every bond
])
def test_tuple_ranks_are_normalized_by_their_method_and_survive_a_save(sets, rank, tmp_path):
    cfg, _ = build_config(overrides=sets)
    assert cfg["param"]["rank"] == rank
    again, _ = build_config([save_config(cfg, tmp_path / "c.yml")])
    assert again == cfg


@pytest.mark.parametrize("sets,message", [
    (["param.name=sttp-r", "param.rank=[4, 8]"],
     "config param.rank = [4, 8]: sttp-r: rank must be a positive integer, got (4, 8)"),
    (["param.name=tt", "param.rank=[4, 0, 4]"],
     "config param.rank = [4, 0, 4]: tt: rank must be a positive integer or a tuple of positive integers, "
     "got (4, 0, 4)"),
    (["param.name=ht", "param.rank=[[4, 8], [3, 3, 3]]"],
     "config param.rank = [[4, 8], [3, 3, 3]]: ht: an inner node of a rank tree is (rank, left, right), got (4, 8) "
     "in ([4, 8], [3, 3, 3])"),
    (["param.name=sn", "param.rank=[4, 8]"], "param.rank = [4, 8]: 'sn' takes no rank (ranks are for the "
                                                   "low-rank parameterizations)"),
])
def test_bad_tuple_ranks_are_one_message_from_the_method(sets, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=sets)
    assert str(err.value) == message


def test_keep_dense_if_no_gain_is_on_by_default_and_can_be_turned_off():
    cfg, _ = build_config(overrides=["param.name=sttp-r", "param.compression=10"])
    assert cfg["param"]["keep_dense_if_no_gain"] is True
    off, _ = build_config(overrides=["param.name=sttp-r", "param.compression=10",
                                     "param.keep_dense_if_no_gain=false"])
    assert off["param"]["keep_dense_if_no_gain"] is False
    with pytest.raises(ConfigError, match=r"^config param.keep_dense_if_no_gain = 'maybe': expected true or false$"):
        build_config(overrides=["param.keep_dense_if_no_gain=maybe"])
