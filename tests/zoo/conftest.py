"""The zoo: real architectures from torchvision, timm, Ultralytics and transformers, built from their configs with
random weights (nothing downloaded), checked against naive freezing in float64.

Locally a missing zoo package skips its file with the reason; CI sets ``FREEZERT_ZOO=require`` (``.ci/run``)
so that a missing package fails the run instead (``_conformance.need``).
"""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest
import torch


def pytest_report_header(config):
    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    pkgs = ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "timm", "ultralytics", "transformers"))
    return f"zoo: {pkgs}; FREEZERT_ZOO={os.environ.get('FREEZERT_ZOO', '(unset: a missing package skips)')}"


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch-2 models at 32-64 px are too small for intra-op threads to pay, and on a loaded 2-core machine
    two spinning threads slow each step down many times over; the rest of the suite keeps its setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
