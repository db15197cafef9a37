"""`make demo` (configs/demo.yml), end to end through the command line: it must show learning."""
import json
from pathlib import Path

from click.testing import CliRunner

from sttpfast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_learns_with_its_own_seed(tmp_path):
    result = CliRunner().invoke(main, ["train", "--cfg", str(ROOT / "configs/demo.yml"), "--out", str(tmp_path),
                                       "--logger", "none", "--set", "log.progress=false"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "rank 8"
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert (summary["param"], summary["rank"], round(summary["z_percent"], 2)) == ("sttp-r", 8, 4.9)
    assert summary["metrics"]["accuracy"] > 0.7, summary["metrics"]
