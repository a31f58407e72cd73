"""The Python suite imports qkv from the build tree (QKV_PYTHONPATH, set by ctest) and the NumPy
contract from tests/cli."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "cli"))
if os.environ.get("QKV_PYTHONPATH"):
    sys.path.insert(0, os.environ["QKV_PYTHONPATH"])
