"""YAML configs merged in order, dotted overrides, unknown keys, presets."""
from pathlib import Path

import pytest

from sttpfast.config import ConfigError, build_config, save_config

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
    cfg, _ = build_config([a], overrides=["optim.lr=0.01", "param.include=[blocks.*, fc]"], cli={"optim.lr": 0.3})
    assert cfg["optim"]["lr"] == 0.01
    assert cfg["param"]["include"] == ["blocks.*", "fc"]


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        build_config(overrides=["optim.lrr=0.1"])
    bad = write(tmp_path, "bad.yml", "optm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optm.lr' in .*bad.yml"):
        build_config([bad])


@pytest.mark.parametrize("pair,message", [
    ("optim.epochs=0", "epochs >= 1"), ("data.bs=-1", "positive integer"), ("optim.opt=rmsprop", "sgd or adam"),
    ("log.logger=mlflow", "tensorboard, wandb or none"), ("optim.lr", "key=value"),
])
def test_bad_values(pair, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[pair])


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config([write(tmp_path, "x.yml", "optim: [unclosed\n")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config([write(tmp_path, "y.yml", "- 1\n- 2\n")])


def test_model_kwargs_are_free_form_and_config_round_trips(tmp_path):
    cfg, _ = build_config(overrides=["model.kwargs={drop_rate: 0.3}"])
    assert cfg["model"]["kwargs"] == {"drop_rate": 0.3}
    again, _ = build_config([save_config(cfg, tmp_path / "c.yml")])
    assert again == cfg


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").rglob("*.yml")), ids=lambda p: p.name)
def test_every_preset_is_valid(preset):
    cfg, _ = build_config([ROOT / "configs/env.yml", preset])
    assert cfg["model"]["arch"]


def test_paper_preset_values():
    cfg, _ = build_config([ROOT / "configs/aistats21/figure7_classification/sttp_r32.yml"])
    assert (cfg["model"]["arch"], cfg["param"]["name"], cfg["param"]["rank"]) == ("wrn28_10", "sttp-r", 32)
    assert (cfg["optim"]["lr"], cfg["optim"]["wd"], cfg["optim"]["steps"], cfg["optim"]["schedule"]) == \
        (0.1, 1e-4, 100000, "linear")
