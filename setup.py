"""Install megaocto: `pip install -e .` (add `[test]` for the test tools, `[hub]` to read HumanEvalPack from the hub).

The C++ index helpers in csrc/ are compiled as an optional extension: when no compiler is
available the pure-numpy fallback in megaocto.data is used instead (slower, same results).

Optional prebuilt CUDA kernels (megaocto._cuda_kernels, from csrc/*.cu + csrc/cuda_kernels_binding.cpp):
built at install time, never at import or training start, when

* ``MEGAOCTO_BUILD_CUDA=1``: always (the install fails if nvcc or the build fails);
* ``MEGAOCTO_BUILD_CUDA=0``: never;
* unset (default): only when the installed torch is a CUDA build AND nvcc is found (``$CUDA_HOME/bin/nvcc``,
  else on PATH); a failed build is then skipped with a warning (megaocto runs on its Triton/torch kernels).

The default CPU install does not import torch here (torch/version.py is read as text), so it stays as fast as
before. Each .cu is compiled by nvcc to an object (arches from ``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0";
"+PTX" adds PTX), then the binding is built and linked by torch's ``BuildExtension`` against ``libcudart``.
Because the .cu files include only CUDA headers, the same recipe also builds on a CPU torch (e.g. CI). Build
with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import importlib.util
import os
import re
import shutil
import subprocess

from setuptools import Extension, find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))

CUDA_SOURCES = ["csrc/bias_gelu.cu", "csrc/scaled_masked_softmax.cu"]
CUDA_BINDING = "csrc/cuda_kernels_binding.cpp"


def torch_cuda_version():
    """``torch.version.cuda`` of the installed torch without importing it (None: CPU build or no torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return m.group(1) if m else None


def find_nvcc():
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else the one on PATH; None when absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc):
    """The toolkit root: ``$CUDA_HOME``, else /usr/local/cuda when it exists, else nvcc's grandparent folder.

    (/usr/local/bin/nvcc may be a wrapper script, so its own location is tried last.)
    """
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if root:
        return root
    if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        return "/usr/local/cuda"
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_build_decision(env=None):
    """``(build, required, reason)`` for the CUDA extension (see the module docstring for the rules)."""
    env = os.environ if env is None else env
    flag = env.get("MEGAOCTO_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"setup.py: MEGAOCTO_BUILD_CUDA must be 0, 1 or unset (got {flag!r})")
    if flag == "0":
        return False, False, "MEGAOCTO_BUILD_CUDA=0"
    nvcc = find_nvcc()
    if flag == "1":
        if nvcc is None:
            raise SystemExit("setup.py: MEGAOCTO_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA "
                             "toolkit (with bin/nvcc) or put nvcc on PATH")
        return True, True, "MEGAOCTO_BUILD_CUDA=1"
    cuda = torch_cuda_version()
    if cuda is None:
        return False, False, "torch is not a CUDA build"
    if nvcc is None:
        return False, False, "no nvcc (set CUDA_HOME)"
    return True, False, f"CUDA torch ({cuda}) and nvcc found"


def gencode_flags(arch_list):
    """nvcc ``-gencode`` flags for a ``TORCH_CUDA_ARCH_LIST`` value such as ``"8.0;9.0+PTX"`` or ``"8.0 9.0a"``."""
    flags = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            raise SystemExit(f"setup.py: TORCH_CUDA_ARCH_LIST entry {item!r} is not like 8.0, 9.0a or 9.0+PTX")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise SystemExit("setup.py: TORCH_CUDA_ARCH_LIST is empty")
    return flags


ext_modules = []
cmdclass = {}
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

_build_cuda, _cuda_required, _cuda_reason = cuda_build_decision()
if _build_cuda:
    # Only here is torch imported (its build helpers give the include paths, ABI flag and libraries).
    try:
        from setuptools.errors import CompileError
    except ImportError:  # old setuptools
        from distutils.errors import CompileError

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    _nvcc = find_nvcc()
    _home = cuda_home(_nvcc)
    _lib = next((p for p in (os.path.join(_home, "lib64"), os.path.join(_home, "lib"))
                 if os.path.isdir(p)), os.path.join(_home, "lib64"))
    print(f"setup.py: building megaocto._cuda_kernels ({_cuda_reason}; nvcc {_nvcc}, CUDA {_home})")
    _cuda_ext = CppExtension(
        "megaocto._cuda_kernels",
        sources=[CUDA_BINDING],
        include_dirs=[os.path.join(_home, "include")],
        library_dirs=[_lib],
        libraries=["cudart"],
        extra_compile_args=["-O3"],
        extra_link_args=[f"-Wl,-rpath,{_lib}"],
    )
    _cuda_ext.optional = not _cuda_required
    ext_modules.append(_cuda_ext)

    class _BuildWithNvcc(BuildExtension):
        """torch's BuildExtension, plus: compile csrc/*.cu with nvcc and link the objects into the CUDA binding."""

        def build_extension(self, ext):
            if ext.name == "megaocto._cuda_kernels":
                gencode = gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
                out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
                os.makedirs(out_dir, exist_ok=True)
                objects = []
                for src in CUDA_SOURCES:
                    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
                    cmd = [_nvcc, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode,
                           os.path.join(here, src), "-o", obj]
                    print(" ".join(cmd))
                    if subprocess.run(cmd).returncode != 0:
                        raise CompileError(f"nvcc failed on {src}")
                    objects.append(obj)
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    cmdclass["build_ext"] = _BuildWithNvcc.with_options(use_ninja=False)

setup(
    name="megaocto",
    version="0.1.0",
    description="Megatron-style tensor-parallel training for instruction-tuning code LLMs (OctoPack style)",
    packages=find_packages(include=["megaocto", "megaocto.*"]),
    package_data={"megaocto": ["resources/*", "resources/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # Every third-party package a shipped path imports is declared here, or its import is guarded with an error that
    # says what to install (tests/test_dependencies.py scans megaocto/ and checks this list).
    install_requires=[
        # torch is pinned by .ci/setup (CPU wheel); a range keeps users' CUDA builds.
        "torch>=2.3",
        "triton",
        "einops",
        "numpy",
        "tokenizers",
        "sentencepiece",
        # launch/configs/starcoder-15b-octopack.yaml turns W&B on (logging.wandb).
        "wandb",
        "safetensors",
        "pyyaml",
        # Declared, not optional: every shipped run config sets logging.tensorboard (torch.utils.tensorboard
        # imports it). 2.17.1 is the first release that works with numpy 2, which pip installs by default
        # (tensorflow/tensorboard#6871: np.string_ was removed in numpy 2.0).
        "tensorboard>=2.17.1",
        # Declared, not optional: `megaocto convert to-hf` builds every exported config.json through transformers
        # (GPTBigCodeConfig / GlmConfig), and --verify, `make demo` and the README's round trip load the export
        # with it. 4.56 is the first release with the `dtype=` argument of from_pretrained and PretrainedConfig
        # (huggingface/transformers#39782) that megaocto.convert uses; GlmConfig itself needs >= 4.46.
        "transformers>=4.56",
        # `megaocto convert from-hf OWNER/NAME` resolves hub ids through huggingface_hub's cache (convert/io.py);
        # transformers 4.56 already requires >= 0.34, stated here because megaocto imports it directly.
        "huggingface_hub>=0.34",
        # megaocto serve (an ASGI app on uvicorn) and megaocto instruct (teacher client over httpx, progress bars,
        # Aho-Corasick decontamination)
        "starlette",
        "uvicorn",
        "httpx",
        "tqdm",
        "pyahocorasick",
    ],
    extras_require={
        # peft: tests/test_lora_peft.py checks LoRA parity and the PEFT export against HF PEFT itself; openai: the
        # official client drives `megaocto serve` in tests/test_serving.py.
        "test": ["pytest", "peft>=0.13", "openai"],
        # Optional: only `megaocto eval humanevalpack` without --data-dir reads bigcode/humanevalpack from the hub
        # through `datasets`; that import is guarded with an error naming the package (offline runs never need it).
        "hub": ["datasets"],
    },
    entry_points={"console_scripts": ["megaocto = megaocto.cli:main"]},
)
