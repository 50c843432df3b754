"""Models and inputs by name, as the command line takes them: a built-in model, ``package.module:factory`` or a
checkpoint file; ``--freeze`` in every form ``freeze=`` takes; a random batch of an ``--input`` shape."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from .._errors import FreezeError
from .catalog import MODELS, YOLOS

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def load_model(spec: str) -> nn.Module:
    """A built-in model name, ``package.module:factory`` (called with no arguments) or a checkpoint path."""
    import torch
    import torch.nn as nn

    if spec in MODELS:
        from .variants import build_model

        return build_model(spec)
    if os.path.isfile(spec):
        # A pickled module: unpickling runs code from the file, as torch.load(weights_only=False) always does.
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(obj, dict):  # Ultralytics/YOLOv5 checkpoints keep the module under "model" (or "ema")
            obj = next((obj[k] for k in ("model", "ema", "module") if isinstance(obj.get(k), nn.Module)), obj)
        if isinstance(obj, nn.Module):
            return obj
        what = "a state_dict (weights only)" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise SystemExit(
            f"freezert: --model {spec} holds {what}, not a pickled nn.Module; save the module itself "
            "(torch.save(model, path)) or pass --model package.module:factory that builds it"
        )
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path:  # the console script's path lacks the working directory; python -m has it
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(mod_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"freezert: --model {spec}: cannot import it ({e}); pass package.module:factory") from None
        model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
        if not isinstance(model, nn.Module):
            raise SystemExit(
                f"freezert: --model {spec} gave a {type(model).__name__}, not an nn.Module; "
                "point it at a module or a function that returns one"
            )
        return model
    raise SystemExit(
        f"freezert: --model {spec!r} is neither a built-in model ({', '.join(MODELS)}), a package.module:factory "
        "nor an existing checkpoint file"
    )


def _freeze_item(s: str):
    if s.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_freeze(text: str):
    """``--freeze`` as ``freeze=`` takes it: ``10``, ``0.5``, ``model.3``, ``none``; a comma makes a list
    (``0,1,2``, ``model.1,model.2``; ``3,`` is the one-item list [3])."""
    if "," not in text:
        return _freeze_item(text.strip())
    items = [_freeze_item(s.strip()) for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"freezert: --freeze {text!r} lists nothing; pass e.g. 0,1,2 or model.1,model.2")
    return items


def example_input(model: str, shape: str | None) -> torch.Tensor | None:
    """A random batch of ``--input``'s shape (float images; integer tokens for the built-in encoder), or None;
    the built-in models have a default shape."""
    import torch

    if shape is None:
        shape = {"cnn": "2,3,64,64", "encoder": "2,32"}.get(model, "2,3,128,128" if model in YOLOS else None)
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape.split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise FreezeError(f"--input {shape!r} is not a shape; pass positive sizes such as 2,3,224,224")
    g = torch.Generator().manual_seed(0)
    if model == "encoder":
        return torch.randint(0, 100, dims, generator=g)
    return torch.rand(dims, generator=g)
