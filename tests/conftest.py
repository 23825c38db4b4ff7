import os

import pytest
import torch

# Tests run on 2 CPU cores in CI; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
