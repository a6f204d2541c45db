"""Every ``>>>`` example in the two packages' docstrings runs and prints what it shows.

Examples that need data or a GPU are written as ``::`` blocks (shown, not run); everything with
``>>>`` is executed here, so a renamed function or a changed shape cannot leave a docstring
that lies."""

import doctest
import importlib
import pkgutil

import pytest

import podiff
import podiff_kernels


def _modules():
    names = []
    for package in (podiff, podiff_kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(set(names))


MODULES = _modules()


def test_every_module_is_collected():
    assert {"podiff.latent.pod", "podiff.core.io", "podiff_kernels.ops.patch_decode",
            "podiff_kernels.ops.patch_stats"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name, globs={**vars(module)}) if t.examples]
    if not tests:
        pytest.skip(f"{name} has no >>> examples")
    for test in tests:
        runner.run(test, out=lambda s: None)
    result = runner.summarize(verbose=False)
    if result.failed:
        # Rerun verbosely into the message: which example, what it printed.
        lines = []
        for test in tests:
            doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).run(
                test, out=lines.append)
        pytest.fail(f"{result.failed} of {result.attempted} examples failed in {name}:\n" + "".join(lines)[-4000:])
