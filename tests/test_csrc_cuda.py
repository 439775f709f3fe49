"""CUDA sources in csrc/: compile checks that run on a CPU-only machine, setup.py's build decision, the loader.

- every csrc/*.cu compiles with ``nvcc -c`` for sm_80 and sm_90 and exports its extern "C" launchers;
- csrc/cuda_kernels_binding.cpp compiles (g++ -fsyntax-only) against the installed torch's headers and declares
  exactly the launchers the .cu files define;
- a default install on a CPU torch neither builds the CUDA extension nor imports torch in setup.py;
- megaocto.kernels.cuda loads the prebuilt module or returns None; on a GPU with the module built, the kernels
  match torch (skipped elsewhere).
Compile tests are skipped (with the reason) when nvcc / g++ are absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from megaocto.kernels import cuda as cuda_kernels

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
BINDING = CSRC / "cuda_kernels_binding.cpp"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
GXX = shutil.which("g++")
CUDA_INCLUDE = next((p for p in ("/usr/local/cuda/include", os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"),
                                                                            "include"))
                     if os.path.exists(os.path.join(p, "cuda_runtime_api.h"))), None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA compile checks need a CUDA toolkit")


def _launchers(text: str) -> set[str]:
    return set(re.findall(r"\b(megaocto_\w+)\s*\(", text))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Start every compile at once (they are independent; 2 cores), return {name: (returncode, output, obj)}."""
    out = tmp_path_factory.mktemp("csrc")
    jobs = {}
    if NVCC is not None:
        for cu in CU_FILES:
            obj = out / (cu.stem + ".o")
            cmd = [NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80",
                   "-gencode", "arch=compute_90,code=sm_90", str(cu), "-o", str(obj)]
            jobs[cu.name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
    if GXX is not None and CUDA_INCLUDE is not None:
        from torch.utils.cpp_extension import include_paths
        incs = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], CUDA_INCLUDE]]
        cmd = [GXX, "-fsyntax-only", "-std=c++20", *incs, "-DTORCH_EXTENSION_NAME=_cuda_kernels",
               "-DTORCH_API_INCLUDE_EXTENSION_H", str(BINDING)]
        jobs[BINDING.name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                              None)
    results = {}
    for name, (proc, obj) in jobs.items():
        output, _ = proc.communicate()
        results[name] = (proc.returncode, output, obj)
    return results


def test_cuda_sources_exist():
    assert {p.name for p in CU_FILES} >= {"bias_gelu.cu", "scaled_masked_softmax.cu"}
    for cu in CU_FILES:
        text = cu.read_text()
        assert "torch" not in re.sub(r"//.*", "", text), f"{cu.name} must include only CUDA headers"
        assert 'extern "C"' in text and _launchers(text), f"{cu.name} exports no extern \"C\" megaocto_* launcher"


@needs_nvcc
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_cu_compiles_for_sm80_sm90(compiled, cu):
    rc, output, obj = compiled[cu]
    assert rc == 0, f"nvcc failed on csrc/{cu}:\n{output}"
    blob = obj.read_bytes()
    for name in _launchers((CSRC / cu).read_text()):
        assert name.encode() in blob, f"{name} missing from the object of csrc/{cu} (not extern \"C\"?)"


@needs_nvcc
@pytest.mark.skipif(GXX is None, reason="g++ not found")
def test_binding_compiles_against_torch_headers(compiled):
    rc, output, _ = compiled[BINDING.name]
    assert rc == 0, f"g++ -fsyntax-only failed on csrc/{BINDING.name}:\n{output}"
    declared = _launchers(BINDING.read_text())
    defined = set().union(*(_launchers(p.read_text()) for p in CU_FILES))
    assert declared == defined, f"binding declares {sorted(declared)}, .cu files define {sorted(defined)}"


def _setup_py(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MEGAOCTO_BUILD_CUDA"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-X", "importtime", "setup.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the default install on a CPU torch")
def test_default_cpu_install_skips_cuda_and_does_not_import_torch():
    res = _setup_py("--name", env_extra={})
    assert res.returncode == 0, res.stderr
    assert "building megaocto._cuda_kernels" not in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported, "setup.py imported torch on a default CPU install"
    assert "setuptools" in imported  # the probe sees imports at all


def test_setup_py_build_flag_is_validated():
    res = _setup_py("--name", env_extra={"MEGAOCTO_BUILD_CUDA": "yes"})
    assert res.returncode != 0 and "MEGAOCTO_BUILD_CUDA must be 0, 1 or unset" in res.stderr


def test_loader_returns_module_only_when_built():
    import megaocto
    built = any(any(Path(p).glob("_cuda_kernels*.so")) for p in megaocto.__path__)
    assert cuda_kernels.available() == built
    if not built:
        assert cuda_kernels.load() is None
        with pytest.raises(RuntimeError, match="MEGAOCTO_BUILD_CUDA=1"):
            cuda_kernels.bias_gelu(torch.randn(2, 3), None)


gpu_and_built = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels.available()),
                                   reason="needs a GPU and megaocto._cuda_kernels built")


@gpu_and_built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_gelu_matches_torch_on_gpu(dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    x = torch.randn(37, 96, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(96, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(37, 96, device="cuda", dtype=dtype)
    got = cuda_kernels.bias_gelu(x, b)
    got.backward(dy)
    gx, gb = x.grad, b.grad
    x.grad = b.grad = None
    want = torch.nn.functional.gelu((x.float() + b.float()), approximate="tanh")
    want.backward(dy.float())
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.float(), x.grad.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gb.float(), b.grad.float(), atol=tol * 10, rtol=tol)


@gpu_and_built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_scaled_masked_softmax_matches_torch_on_gpu(dtype, causal):
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    b, h, sq, sk, scale = 2, 3, 17, 45, 0.125
    x = torch.randn(b, h, sq, sk, device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.rand(b, 1, sq, sk, device="cuda") < 0.3
    mask[0, 0, 4] = True  # one fully masked row -> zeros
    dy = torch.randn(b, h, sq, sk, device="cuda", dtype=dtype)
    got = cuda_kernels.scaled_masked_softmax(x, mask, scale, causal)
    got.backward(dy)
    gx = x.grad
    x.grad = None
    full = mask.expand(b, h, sq, sk).clone()
    if causal:
        full |= torch.ones(sq, sk, dtype=torch.bool, device="cuda").triu(1)  # top-left: key j <= query i
    s = (x.float() * scale).masked_fill(full, float("-inf"))
    s = s.masked_fill(full.all(-1, keepdim=True), 0.0)  # fully masked rows: finite here, zeroed below
    want = torch.softmax(s, -1).masked_fill(full, 0.0)
    want.backward(dy.float())
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.float(), x.grad.float(), atol=tol, rtol=tol)
    assert torch.all(got[0, :, 4] == 0)


@gpu_and_built
def test_scaled_masked_softmax_causal_is_top_left_like_triton():
    """sq != sk: the CUDA kernel's causal mask equals the Triton softmax's (key j <= query i, top-left)."""
    from megaocto.kernels.softmax import scaled_masked_softmax

    x = torch.randn(2, 3, 17, 45, device="cuda")
    got = cuda_kernels.scaled_masked_softmax(x, None, 0.5, True)
    torch.testing.assert_close(got, scaled_masked_softmax(x, 0.5, causal=True), atol=1e-6, rtol=1e-6)
    assert torch.all(got[..., 0, 1:] == 0) and torch.all(got[..., 0, 0] == 1)
