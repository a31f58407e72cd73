"""The Python suite imports qkv from the build tree (QKV_PYTHONPATH, set by ctest) and the NumPy
contract from tests/cli."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "cli"))
if os.environ.get("QKV_PYTHONPATH"):
    sys.path.insert(0, os.environ["QKV_PYTHONPATH"])


@pytest.fixture
def masks_passed(monkeypatch):
    """The (mask option, bias parameter) of every call qkv's functions and layers hand to the
    core, in order (torch tests only)."""
    from qkv import _functions, nn

    seen = []
    run = _functions._run

    def spy(config, q, k, v, parameters):
        seen.append((config.options.get("mask"), parameters.get("bias")))
        return run(config, q, k, v, parameters)

    monkeypatch.setattr(_functions, "_run", spy)
    monkeypatch.setattr(nn, "_run", spy)
    return seen
