"""Builds ctp_fast._C: the CPU kernels always, the CUDA kernels when the installed torch has CUDA.

Install with `pip install --no-build-isolation -e .` after torch (see README.md): build isolation
would fetch a separate, multi-gigabyte torch just to compile against.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=here))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=here))
cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]

with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
# CTP_CUDA_ARCHS (e.g. "90a") narrows the targets, to build faster for one known GPU.
cuda_archs = os.environ.get("CTP_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
if with_cuda:
    print(f"ctp_fast: building CPU and CUDA kernels ({len(cuda_sources)} .cu files, sm_{', sm_'.join(cuda_archs)})")
    ext = cpp_extension.CUDAExtension(
        "ctp_fast._C",
        cpu_sources + ["csrc/bindings_cuda.cpp"] + cuda_sources,
        define_macros=[("CTP_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs],
        },
        extra_link_args=["-fopenmp"],
    )
else:
    why = "no .cu sources" if not cuda_sources else "the installed torch has no CUDA"
    print(f"ctp_fast: building the CPU kernels only ({why})")
    ext = cpp_extension.CppExtension("ctp_fast._C", cpu_sources, extra_compile_args=cxx_flags,
                                     extra_link_args=["-fopenmp"])

setup(ext_modules=[ext], cmdclass={"build_ext": cpp_extension.BuildExtension})
