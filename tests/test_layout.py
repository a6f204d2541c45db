"""The house: imports go down the layers only, the command's defaults are the config's, the config
holds no fitted state, and a model folder of format version 1 loads and samples as it did."""

import ast
import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import podiff
from podiff import PipelineConfig, PODiffPipeline, TrainOptions, calibrate_spread, fit
from podiff.cli import CONFIG_OPTIONS, TRAIN_OPTIONS, _config, _options, build_parser
from podiff.model.state import FITTED_KEYS, Calibration

PACKAGE = Path(podiff.__file__).parent
DATA = Path(__file__).parent / "fixtures"
#: The layers, bottom to top: a module may import its own layer and the ones below it.
LAYERS = ["core", "data", "evaluation", "latent", "diffusion", "mean", "config", "model", "baselines", "fitting",
          "workflows", "interop", "cli"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "podiff" else None


def _imports(path: Path, name: str):
    """Every ``podiff.*`` module a file imports, at the top or inside a function, absolute or relative."""
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_imports_go_down_the_layers_only():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = "podiff." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        own = _layer(name)
        if own is None:  # podiff/__init__.py: the public API re-exports every layer
            continue
        assert own in LAYERS, f"{name}: a package outside the layers {LAYERS}"
        for target in _imports(path, name):
            layer = _layer(target)
            if layer in LAYERS and LAYERS.index(layer) > LAYERS.index(own):
                broken.append(f"{name} imports {target}")
    assert not broken, "imports that climb a layer:\n" + "\n".join(broken)


def test_the_layer_test_sees_a_climb():
    """The walker finds an upward import inside a function (so the test above can fail)."""
    found = set(_imports(PACKAGE / "model" / "persistence.py", "podiff.model.persistence"))
    assert "podiff.latent.pod.PatchPOD" in found and "podiff.model.state.upgrade_saved" in found


def test_every_option_that_sets_the_config_has_its_default():
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "sst", "--out", "run"])
    config, options = PipelineConfig(), TrainOptions()
    for dest, name in CONFIG_OPTIONS.items():
        assert getattr(args, dest) == getattr(config, name), f"--{dest.replace('_', '-')} vs PipelineConfig.{name}"
    for name in TRAIN_OPTIONS:
        assert getattr(args, name) == getattr(options, name), f"--{name.replace('_', '-')} vs TrainOptions.{name}"
    # no option named like a config field escapes the map
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    config_fields = {f.name for f in fields(PipelineConfig)}
    unmapped = {a.dest for a in train._actions if a.dest in config_fields} - set(CONFIG_OPTIONS.values())
    # the two the workflow resolves from the data: the scale (None: the file's own) and the bounds ("auto")
    assert unmapped == {"scale", "bounds"}
    assert args.scale is None and args.bounds == "auto" and config.bounds is None
    assert _config(args) == config and _options(args) == options  # podiff train builds PipelineConfig()


def test_the_demo_changes_only_its_domain_settings():
    from podiff.workflows.demo import DEMO_DEFAULTS, demo_config

    args = build_parser().parse_args(["demo", "--dataset", "mri"])
    built = _config(args, demo_config("mri"))
    changed = {k for k, v in asdict(built).items() if v != getattr(PipelineConfig(), k)}
    assert changed == set(DEMO_DEFAULTS["mri"]) - {k for k, v in DEMO_DEFAULTS["mri"].items()
                                                   if v == getattr(PipelineConfig(), k)}


def test_the_config_holds_no_fitted_state_and_is_copied():
    assert not set(FITTED_KEYS) & {f.name for f in fields(PipelineConfig)}
    assert {"prediction_type", "learning_rate"} <= {f.name for f in fields(PipelineConfig)}
    config = PipelineConfig(scale=4, rank=4, train_steps=3, batch_size=4, residual="none",
                            denoiser=dict(width=16, depth=1, heads=2))
    hr = torch.randn(12, 1, 16, 16).cumsum(-1) / 4
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    a, b = PODiffPipeline(config), PODiffPipeline(config)
    assert a.config is not config and a.config.denoiser is not config.denoiser
    fit(a, lr[:8], hr[:8], progress=False)
    calibrate_spread(a, lr[8:], hr[8:], num_samples=4, seed=0, bands=1)
    assert a.calibration.spread != 1.0 and a.calibration.error_quantiles is not None
    assert b.calibration == Calibration() and config == PipelineConfig(**asdict(config))
    assert a.config == config  # fitting wrote nothing into the config


def test_a_version_1_model_folder_loads_and_samples_as_it_did(tmp_path):
    """``tests/fixtures/model_v1`` was saved by podiff before the restructuring (format version 1: the
    calibration and the noise correlation in the config, ``prediction`` and ``lr`` by those
    names); ``model_v1_expected.pt`` holds what it sampled then."""
    old = json.loads((DATA / "model_v1" / "config.json").read_text())
    assert old["version"] == 1 and "spread" in old["config"] and "prediction" in old["config"]
    pipe = PODiffPipeline.load(DATA / "model_v1")
    assert pipe.calibration.spread == old["config"]["spread"]
    assert pipe.calibration.error_band_edges == old["config"]["error_band_edges"]
    assert pipe.noise_correlation == old["config"]["noise_correlation"]
    assert pipe.config.prediction_type == old["config"]["prediction"]
    assert pipe.config.learning_rate == old["config"]["lr"]
    assert pipe.training.step == old["step"] and pipe.training.best_step == old["best_step"]
    expected = torch.load(DATA / "model_v1_expected.pt")
    out = pipe.sample(expected["lr"], num_samples=4, steps=3, seed=0)
    torch.testing.assert_close(out.mean, expected["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.variance, expected["variance"], rtol=1e-5, atol=1e-7)
    # saved again, it is version 2 and the same model
    pipe.save(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["version"] == 2
    again = PODiffPipeline.load(tmp_path / "v2").sample(expected["lr"], num_samples=4, steps=3, seed=0)
    torch.testing.assert_close(again.mean, out.mean, rtol=0, atol=0)
    # a version this podiff does not know is an error naming both
    shutil.copytree(DATA / "model_v1", tmp_path / "v9")
    (tmp_path / "v9" / "config.json").write_text(json.dumps({**old, "version": 9}))
    with pytest.raises(ValueError, match="version 9; this podiff reads podiff.PODiffPipeline versions 1 to 2"):
        PODiffPipeline.load(tmp_path / "v9")


def test_the_tests_mirror_the_packages():
    """Each folder of ``tests/`` is a package of ``podiff`` (or the kernels, the benchmark scripts,
    the fixtures); the files at the top are about the whole repository."""
    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders - packages == {"kernels", "benchmarks", "fixtures"}
    assert all(any((tests / name).glob("test_*.py")) for name in folders - {"fixtures"})
