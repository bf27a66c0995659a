"""Builds pykernels and its C++/CUDA extension pykernels._C.

csrc/*.cpp and csrc/cpu/*.cpp are always compiled; csrc/cuda/*.cu too when nvcc and a CUDA
build of torch are present (PYKERNELS_NO_CUDA=1 skips them). The CPU row kernels are
additionally compiled for AVX2 and AVX-512 (x86-64 only) and chosen at run time from the
CPU's features, as ATen does; -march=native would break on other machines.

If the extension cannot be built at all, PYKERNELS_ALLOW_NO_EXT=1 installs the pure-Python
package (Triton and torch backends only).
"""

import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# Kernel sources (csrc/cpu/*_kernel.cpp) are compiled once more per instruction set, with the
# flags ATen uses for the same ISA.
ISA_BUILDS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _find_cuda_home():
    """A CUDA toolkit root with nvcc and lib64/libcudart.so. torch guesses it from the nvcc on
    PATH, which fails where nvcc is installed as /usr/local/bin/nvcc beside /usr/local/cuda-X."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import glob
    import shutil

    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "lib64" / "libcudart.so").exists():
            os.environ["CUDA_HOME"] = root
            return


def _cuda_header_dirs():
    """Headers of the CUDA libraries torch was built with (cuSPARSE, cuBLAS, ...), from the
    nvidia-* wheels torch depends on; a bare toolkit with only nvcc lacks them."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(str(p) for p in Path(base).glob("*/include") if (p / "cusparse.h").exists())
    return dirs


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


def _want_cuda(cpp_extension):
    if os.environ.get("PYKERNELS_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extensions():
    from torch.utils import cpp_extension

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))
    # -fopenmp: at::parallel_for is a header template that runs its range serially in a
    # translation unit compiled without OpenMP, so without it every CPU kernel used one thread.
    # The libgomp.so.1 torch ships is already loaded when _C is, and satisfies ours.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    macros = []
    if _is_x86_64():
        macros.append(("PYKERNELS_HAVE_AVX_KERNELS", None))
    kwargs = dict(
        name="pykernels._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        define_macros=macros,
        py_limited_api=False,
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda(cpp_extension):
        kwargs["sources"] += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        kwargs["include_dirs"] += _cuda_header_dirs()
        nvcc = [
            "-O3",
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-Xcompiler=-fopenmp",
            "-lineinfo",
            # A portable build for any sm_80+ GPU plus Hopper-specific code for the H100/H200.
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_80,code=compute_80",
        ]
        extra_arch = os.environ.get("PYKERNELS_CUDA_EXTRA_GENCODE")
        if extra_arch:
            nvcc += extra_arch.split()
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        return [cpp_extension.CUDAExtension(**kwargs)]
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return [cpp_extension.CppExtension(**kwargs)]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithIsaKernels(BuildExtension):
        """Adds the AVX2/AVX-512 builds of the CPU kernels as extra objects of _C."""

        def build_extension(self, ext):
            if _is_x86_64() and not self.dry_run:
                ext.extra_objects = list(ext.extra_objects or []) + self._compile_isa_kernels(ext)
            super().build_extension(ext)

        def _compile_isa_kernels(self, ext):
            import sysconfig

            import torch
            from torch.utils import cpp_extension

            out_dir = Path(self.build_temp) / "isa"
            out_dir.mkdir(parents=True, exist_ok=True)
            cxx = os.environ.get("CXX", "c++")
            includes = [f"-I{p}" for p in cpp_extension.include_paths()]
            includes += [f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
            base = [cxx, "-c", "-fPIC", "-O3", "-std=c++20", "-fvisibility=hidden",
                    "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DPYKERNELS_HAVE_AVX_KERNELS"]
            jobs = [(src, isa, flags) for src in sorted((CSRC / "cpu").glob("*_kernel.cpp"))
                    for isa, flags in ISA_BUILDS.items()]

            def compile_one(job):
                src, isa, flags = job
                obj = out_dir / f"{src.stem}_{isa.lower()}.o"
                cmd = base + flags + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
                cmd += includes + [str(src), "-o", str(obj)]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
                return str(obj)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                return list(pool.map(compile_one, jobs))

    return BuildWithIsaKernels


def main():
    _find_cuda_home()  # before torch.utils.cpp_extension reads it
    ext_modules, cmdclass = [], {}
    try:
        ext_modules = _extensions()
        cmdclass = {"build_ext": _build_ext_class()}
    except ImportError as exc:  # torch missing at build time
        if os.environ.get("PYKERNELS_ALLOW_NO_EXT") != "1":
            raise RuntimeError(
                "pykernels needs torch installed before it is built: "
                "pip install torch, then pip install --no-build-isolation ."
            ) from exc
        print(f"pykernels: building without the C++ extension ({exc})", file=sys.stderr)
    setup(
        packages=["pykernels", "pykernels.triton_kernels", "pykernels.benchmarks"],
        package_dir={"pykernels": "pykernels", "pykernels.triton_kernels": "triton_kernels",
                     "pykernels.benchmarks": "benchmarks"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


main()
