"""bench/gan.py runs end to end as a script (a minimal budget), so the GAN benchmark cannot rot."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # every test here launches processes (see conftest.py)


ROOT = Path(__file__).resolve().parents[1]


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """``{D: cells}`` of the markdown table the bench prints."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("sn", "svdp-c", "sttp-c", "sttp-r"):
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_gan_runs_as_a_script(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gan.py"), "--steps", "2", "--seeds", "0", "--metrics-samples", "64",
         "--extractor-steps", "2", "--timing-repeats", "1", "--width", "0.125", "--bs", "8", "--subset", "256",
         "--trace-points", "2", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| D |"))
    assert "FID(sttpfast-resnet20-fashion_mnist)" in header and "IS(sttpfast-resnet20-fashion_mnist)" in header
    assert "G widths 32 / D widths 16 (x0.125 of the paper's), D rank 8, batch 8, 2 G steps x 5 D steps" in result.stdout
    rows = _table_rows(result.stdout)
    assert list(rows) == ["sn", "svdp-c", "sttp-c", "sttp-r"]
    # Z of the paper's D (3 channels: the paper's numbers; 1 channel: Fashion-MNIST's) and of
    # the D trained here (width 16, rank 8)
    assert [rows[p][:3] for p in rows] == [["100.00", "100.00", "100.00"], ["51.74", "51.66", "52.07"],
                                           ["16.71", "16.54", "17.57"], ["18.33", "18.13", "19.52"]]
    for cells in rows.values():
        fid, isc = float(cells[3].split()[0]), float(cells[4].split()[0])
        assert math.isfinite(fid) and fid > 0 and isc >= 1.0
        assert float(cells[5]) > 0
    assert rows["sn"][6] == "1.00" and rows["sn"][7] == "1.00 (1.00-1.00)"
    png = out / "sigma_max.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "extractor.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sn-seed0", "sttp-c-seed0", "sttp-r-seed0",
                                                                   "svdp-c-seed0"]
