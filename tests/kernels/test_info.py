"""python -m podiff_kernels.info: versions, backends and why, extension cache."""

import json
import subprocess
import sys


def test_info_text_and_json():
    text = subprocess.run([sys.executable, "-m", "podiff_kernels.info"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    for words in ("podiff_kernels 0.1.0", "torch", "C++ extension", "cache:", "patch_encode", "cpu/local"):
        assert words in text.stdout
    js = subprocess.run([sys.executable, "-m", "podiff_kernels.info", "--json"], capture_output=True, text=True,
                        timeout=120)
    info = json.loads(js.stdout)
    assert info["ops"]["patch_decode"]["cpu/shared"]["backend"] in ("torch", "cpp")
    assert info["extension"]["cache_dir"]
