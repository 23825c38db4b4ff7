import importlib.util
import os

import pytest
import torch

# Tests run on 2 CPU cores in CI; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Packages some tests need that a machine may lack: the GPU machine's image has no `datasets`
# (Hugging Face data loading) and no `jsonargparse` (LightningCLI). Where one is not installed, a
# test that fails for want of it is reported as skipped, naming the package, instead of failed;
# where it is installed (CI) nothing changes.
OPTIONAL_PACKAGES = ("datasets", "jsonargparse")


def _missing_optional(exc: BaseException):
    """The optional package ``exc`` says is missing, when it really is not installed here."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    for pkg in OPTIONAL_PACKAGES:
        named = exc.name == pkg or (exc.name or "").startswith(pkg + ".") or pkg in str(exc)
        if named and importlib.util.find_spec(pkg) is None:
            return pkg
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed":
        return
    pkg = _missing_optional(call.excinfo.value)
    if pkg is not None:
        report.outcome = "skipped"
        path, line, _ = item.reportinfo()
        report.longrepr = (str(path), (line or 0) + 1, f"Skipped: needs `{pkg}`, which is not installed here")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Hypothesis profiles for tests/test_properties.py: "ci" (default) keeps each property's own
# small example count; `pytest --hypothesis-profile=long` runs 20x more for a local soak.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", deadline=None, derandomize=True)
    _hyp_settings.register_profile("long", deadline=None, max_examples=1000)
    _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra
    pass
