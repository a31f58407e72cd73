"""Builds qkv's Python extension with the project's CMake (see pyproject.toml for the command).

The CMake build lives in build/pip inside the source tree, so a second install (a venv, then
--target) reuses the compiled objects."""
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = pathlib.Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = SOURCE / "build" / "pip"
        subprocess.check_call([
            "cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DQKV_BUILD_TESTS=OFF", "-DQKV_BUILD_TOOLS=OFF", "-DQKV_BUILD_PYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}"])
        subprocess.check_call(["cmake", "--build", str(build), "--target", "qkv_python", "-j",
                               str(os.cpu_count() or 1)])
        built = next((build / "python" / "qkv").glob("_qkv*.so"))
        target = pathlib.Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


setup(
    packages=["qkv"],
    package_dir={"": "python"},
    package_data={"qkv": ["*.pyi", "py.typed"]},
    ext_modules=[CMakeExtension("qkv._qkv")],
    cmdclass={"build_ext": CMakeBuild},
)
