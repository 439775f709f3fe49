"""Install megaocto: `pip install -e .` (add `[test]` for the test tools).

The C++ index helpers in csrc/ are compiled as an optional extension: when no compiler is
available the pure-numpy fallback in megaocto.data is used instead (slower, same results).
"""
import os

from setuptools import Extension, find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))

ext_modules = []
if os.path.exists(os.path.join(here, "csrc", "helpers.cpp")):
    ext_modules.append(
        Extension(
            "megaocto._helpers",
            sources=["csrc/helpers.cpp"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
            optional=True,  # never fail the install: megaocto.data falls back to numpy
        )
    )

setup(
    name="megaocto",
    version="0.1.0",
    description="Megatron-style tensor-parallel training for instruction-tuning code LLMs (OctoPack style)",
    packages=find_packages(include=["megaocto", "megaocto.*"]),
    package_data={"megaocto": ["resources/*", "resources/**/*"]},
    ext_modules=ext_modules,
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by .ci/setup (CPU wheel); a range keeps users' CUDA builds.
        "torch>=2.3",
        "triton",
        "einops",
        "numpy",
        "tokenizers",
        "sentencepiece",
        "wandb",
        "safetensors",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "transformers", "tensorboard"],
    },
    entry_points={"console_scripts": ["megaocto = megaocto.cli:main"]},
)
