"""The apex norm probe (megaocto/model/common.py): a python-only apex install — `apex` and
`apex.normalization.fused_layer_norm` import, the compiled `fused_layer_norm_cuda` does not — must be rejected when
the norm kernels are chosen (falling back to torch with one logged line), not crash at the first CUDA forward.

The apex packages here are real module trees in a tmp dir on sys.path, shaped like apex's own: the python module
imports the extension lazily, inside the forward."""
from __future__ import annotations

import logging
import sys
import types

import pytest
from megaocto.model import common

# apex/normalization/fused_layer_norm.py as apex ships it, reduced: the extension is imported on first use.
FUSED_LAYER_NORM_PY = '''
import importlib
fused_layer_norm_cuda = None

def _ext():
    global fused_layer_norm_cuda
    if fused_layer_norm_cuda is None:
        fused_layer_norm_cuda = importlib.import_module("fused_layer_norm_cuda")
    return fused_layer_norm_cuda

def fused_layer_norm_affine(x, weight, bias, normalized_shape, eps):
    return _ext().forward_affine(x, normalized_shape, weight, bias, eps)

def fused_rms_norm_affine(x, weight, normalized_shape, eps):
    return _ext().rms_forward_affine(x, normalized_shape, weight, eps)
'''


def _apex_tree(root, *, with_extension: bool):
    pkg = root / "apex" / "normalization"
    pkg.mkdir(parents=True)
    (root / "apex" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "fused_layer_norm.py").write_text(FUSED_LAYER_NORM_PY)
    if with_extension:  # stands in for the compiled extension
        (root / "fused_layer_norm_cuda.py").write_text("def forward_affine(*a): return 'ext'\n")


@pytest.fixture
def fresh_probe(monkeypatch):
    """Unprobed state, and no apex / extension module left in sys.modules from elsewhere."""
    monkeypatch.setattr(common, "_apex_norm_module", None)
    for name in list(sys.modules):
        if name == "apex" or name.startswith("apex.") or name == "fused_layer_norm_cuda":
            monkeypatch.delitem(sys.modules, name)
    yield
    for name in list(sys.modules):  # the tmp-dir modules must not outlive the test
        if name == "apex" or name.startswith("apex.") or name == "fused_layer_norm_cuda":
            del sys.modules[name]


def test_python_only_apex_is_rejected_with_one_logged_line(tmp_path, monkeypatch, fresh_probe, caplog):
    _apex_tree(tmp_path, with_extension=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    import apex.normalization.fused_layer_norm  # noqa: F401  (it does import: the trap)

    cuda_like = types.SimpleNamespace(is_cuda=True)
    with caplog.at_level(logging.WARNING, logger=common.__name__):
        assert common._apex_norm_fn(cuda_like, "layer") is None
        assert common._apex_norm_fn(cuda_like, "rms") is None  # remembered: probed (and logged) once
    assert common._apex_norm_module is False
    lines = [r.getMessage() for r in caplog.records if r.name == common.__name__]
    assert len(lines) == 1 and "fused_layer_norm_cuda" in lines[0] and "torch norms" in lines[0], lines


def test_apex_with_its_extension_is_chosen(tmp_path, monkeypatch, fresh_probe, caplog):
    _apex_tree(tmp_path, with_extension=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    cuda_like = types.SimpleNamespace(is_cuda=True)
    with caplog.at_level(logging.WARNING, logger=common.__name__):
        fn = common._apex_norm_fn(cuda_like, "layer")
    import apex.normalization.fused_layer_norm as fln

    assert fn is fln.fused_layer_norm_affine and fn(None, None, None, (8,), 1e-5) == "ext"
    assert not [r for r in caplog.records if r.name == common.__name__]
