"""benchmarks/domain_scaling.py end to end on small sizes: it trains a model of any domain on crops,
samples fields larger than its training fields in fresh processes and writes the table, so the
RESULTS figures cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "domain_scaling.py"


@pytest.mark.slow
def test_the_script_samples_every_size_and_reports_the_growth(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--sides", "64,192", "--steps", "2", "--members", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [row["side"] for row in result["rows"]] == [64, 192]
    for row in result["rows"]:
        assert row["seconds_per_member"] > 0 and row["peak_rss_mb"] > row["added_rss_mb"] >= 0
        assert row["ns_per_member_pixel"] == pytest.approx(row["seconds_per_member"] / row["side"] ** 2 * 1e9)
    growth = result["rows"][-1]["ns_per_member_pixel"] / result["rows"][0]["ns_per_member_pixel"]
    assert result["per_pixel_growth"] == pytest.approx(growth)
    assert "time per pixel, largest over smallest" in done.stdout
