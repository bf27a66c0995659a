"""pytest configuration for pykernels.

* Without a CUDA device the Triton kernels are exercised through the Triton interpreter:
  TRITON_INTERPRET=1 must be in the environment before anything imports triton, so it is
  set here at import time (conftest is imported before any test module, and pykernels is
  only imported lazily, after this).
* The `gpu` marker: tests that need a CUDA device; skipped when there is none.
* Backends runnable on CPU tensors come from pk.available_backends("cpu"); the
  `cpu_backend` fixture is parametrised over them.
"""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# Make tests/reference.py and tests/helpers.py importable whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

import helpers  # noqa: E402  (does not import pykernels at import time)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (cuda / triton backends on cuda tensors); "
        "skipped when torch.cuda.is_available() is false"
    )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_generate_tests(metafunc):
    if "cpu_backend" in metafunc.fixturenames:
        metafunc.parametrize("cpu_backend", helpers.cpu_backends())


def pytest_report_header(config):
    return (
        f"pykernels tests: CUDA={HAS_CUDA} "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}"
    )
