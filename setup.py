"""Builds skd_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit and a CUDA torch exist.

SKD_SKIP_CUDA_BUILD=1 skips CUDA; TORCH_CUDA_ARCH_LIST overrides DEFAULT_CUDA_ARCH_LIST; SKD_SKIP_EXT=1
builds no extension at all (see the end of this file). A CUDA build records the arch list it compiled for in
skd_kernels/_C_build.json (BUILD_RECORD) next to the library, which tests/test_gpu.py checks the library against.
Build against the installed torch: `pip install --no-build-isolation -e .`.
"""

import glob
import json
import os
import shutil

from setuptools import setup


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder (the one whose bin/ holds nvcc), or None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# Machine code for sm_80 (A100) and sm_90 (H100/H200), plus compute_90 PTX that the driver compiles at load
# time for any newer GPU (without PTX nothing would run there).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

_cuda_home = None if os.environ.get("SKD_SKIP_CUDA_BUILD") == "1" else _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
with_cuda = bool(_cuda_home) and torch.version.cuda is not None and bool(cuda_sources)

# csrc/cpu vectorises through ATen's header-only Vectorized<T>: CPU_CAPABILITY selects its AVX2 variant,
# which the -mavx2/-mfma/-mf16c (fp16 loads) instruction sets then compile to.
cxx_flags = ["-O3", "-fopenmp", "-march=native" if os.environ.get("SKD_NATIVE") == "1" else "-mavx2",
             "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-Wno-unknown-pragmas"]
if with_cuda:
    ext = CUDAExtension(
        "skd_kernels._C",
        sources + cuda_sources,
        extra_compile_args={"cxx": [*cxx_flags, "-DSKD_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("skd_kernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

# The build's record, next to the built library: what tests/test_gpu.py compares the library's SASS and PTX with.
BUILD_RECORD = "_C_build.json"


class RecordingBuildExt(BuildExtension):
    """BuildExtension that, when it (re)builds the CUDA library, writes the TORCH_CUDA_ARCH_LIST it compiled
    for (DEFAULT_CUDA_ARCH_LIST unless the environment set another: `make gpu-check` builds for the present
    GPU only) beside it, and copies the record with the library for --inplace. torch's ninja build relinks every
    time (ninja recompiles what changed, arch flags included); without ninja distutils may skip a library newer
    than its sources whatever the arch list, and the library then keeps the record of the build that made it."""

    def _record(self, ext: object) -> str:
        """The record beside ext's library in the build folder (setuptools builds there, then copies)."""
        library = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
        return os.path.join(os.path.dirname(library), BUILD_RECORD)

    def build_extension(self, ext: object) -> None:
        path = self.get_ext_fullpath(ext.name)
        before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
        super().build_extension(ext)
        if not os.path.exists(path) or os.stat(path).st_mtime_ns == before:
            return
        if with_cuda:
            with open(self._record(ext), "w") as f:
                json.dump({"cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"]}, f)
        elif os.path.exists(self._record(ext)):  # a CPU-only rebuild: the old record describes no library now
            os.remove(self._record(ext))

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()  # every library in the build folder, up to date or not
        for ext in self.extensions:
            inplace = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD)
            if os.path.exists(self._record(ext)):
                shutil.copyfile(self._record(ext), inplace)
            elif os.path.exists(inplace):
                os.remove(inplace)


# SKD_SKIP_EXT=1 installs the Python packages only: `make` does that for `pip install -e` (whose build folder
# is a fresh temp dir every time, i.e. a full rebuild) and builds the extension with
# `setup.py build_ext --inplace`, whose ninja folder build/ persists, so a re-run recompiles only what changed.
setup(
    ext_modules=[] if os.environ.get("SKD_SKIP_EXT") == "1" else [ext],
    cmdclass={"build_ext": RecordingBuildExt.with_options(use_ninja=True)},
)
