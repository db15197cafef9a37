"""The command line, run as a user would (click's runner and a real subprocess)."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sttpfast.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_info_sngan_discriminator_z():
    result = run("info", "--arch", "sngan_d32", "--param", "svdp-c", "--rank", "64")
    assert result.exit_code == 0, result.output
    assert "Z = 51.74%" in result.output and "blocks.1.conv1" in result.output


def test_info_compression_target():
    result = run("info", "--arch", "resnet20_cifar", "--param", "sttp", "--compression", "10")
    assert result.exit_code == 0, result.output
    assert "Z = 1" in result.output or "Z = 9" in result.output


def test_info_any_timm_model():
    result = run("info", "--arch", "resnet18", "--param", "svdp", "--rank", "8", "--num-classes", "10")
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.output


@pytest.mark.parametrize("args,message", [
    (["--arch", "wrn28_1", "--param", "sttp"], "unknown architecture 'wrn28_1'; did you mean"),
    (["--arch", "wrn16_4", "--param", "sttpx"], "unknown parameterization 'sttpx'"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "0"], "rank must be a positive integer"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "x"], "'x' is not a valid integer"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "4", "--compression", "3"], "either rank or compression"),
    (["--arch", "wrn16_4", "--param", "sttp", "--compression", "150"], r"compression must be in \(0, 100\]"),
    (["--arch", "wrn16_4", "--param", "sttp", "--include", "nope"], "matches no"),
    (["--arch", "wrn16_4", "--param", "sttp", "--include", "bn"], "'bn' is a BatchNorm2d"),
])
def test_info_bad_input_exit_2_one_message(args, message):
    import re

    result = run("info", *args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output


def test_console_script_subprocess():
    proc = subprocess.run([sys.executable, "-m", "sttpfast.cli", "info", "--arch", "sngan_d32",
                           "--param", "sttp-c", "--rank", "64"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Z = 16.71%" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "sttpfast.cli", "info", "--arch", "sngan_d32", "--param", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown parameterization" in bad.stderr
