"""Each freezert.integrations module imports without the other ecosystems, and names its extra when its own
package is missing."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    "adapter, package, extra",
    [("lightning", "lightning", "lightning"), ("transformers", "transformers", "hf")],
)
def test_a_missing_package_names_the_extra(monkeypatch, adapter, package, extra):
    for name in [n for n in sys.modules if n.split(".")[0] in (package, "pytorch_lightning")] + [
        package,
        "pytorch_lightning",
    ]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import package...` raise ImportError
    monkeypatch.delitem(sys.modules, f"freezert.integrations.{adapter}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'freezert\[{extra}\]'"):
        importlib.import_module(f"freezert.integrations.{adapter}")


def test_composer_and_ultralytics_adapters_import_without_their_packages(monkeypatch):
    for name in ("composer", "ultralytics", "lightning", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    for adapter in ("composer", "ultralytics"):
        monkeypatch.delitem(sys.modules, f"freezert.integrations.{adapter}", raising=False)
        importlib.import_module(f"freezert.integrations.{adapter}")
