"""benchmarks/end_to_end.py in miniature (2 training steps, 12 SST fields), so the script that
writes the cost-comparison table cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "end_to_end.py"


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path):
    pytest.importorskip("xarray")  # the packaged SST
    out = tmp_path / "e2e.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "sst", "--steps", "2", "--members", "2",
                           "--limit", "12", "--methods", "pod-vit p4,pixel p4,global-pod mlp", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]["sst"]
    assert [r["method"] for r in rows] == ["pod-vit p4", "pixel p4", "global-pod mlp"]
    for r in rows:
        assert r["parameters"] > 0 and r["train_s_per_step"] > 0 and r["sample_s_per_member"] > 0
        assert r["rmse"] > 0 and r["crps"] > 0 and r["train_peak_mib"] > 0
    assert rows[1]["rank"] == 16 and rows[2]["tokens"] == 1  # identity basis r = p²; one global token
    table = out.read_text()
    assert table.count("\n| pod-vit p4 |") == 1 and "sample time vs POD-ViT" in table
