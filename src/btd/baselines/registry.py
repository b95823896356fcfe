"""Name -> baseline class, resolved lazily from "module:Class" strings.

Lazy resolution keeps `import btd.baselines` cheap and lets baselines whose modules are written
separately (or need optional packages) be registered before they exist.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from btd.baselines.base import Baseline
from btd.errors import BTDConfigError

#: The paper's eight unsupervised baselines (Table 1) by registry name.
REGISTRY: dict[str, str] = {
    "ae": "btd.baselines.autoencoders:ConvAE",
    "unet_ae": "btd.baselines.autoencoders:UNetAE",
    "inpaint_ae": "btd.baselines.autoencoders:InpaintAE",
    "oc_vae": "btd.baselines.autoencoders:OCVAE",
    "vit_ae": "btd.baselines.vit_ae:SatelliteViT",
    "splicebuster": "btd.baselines.splicebuster:SpliceBuster",
    "spliceradar": "btd.baselines.spliceradar:SpliceRadar",
    "ood_ddpm": "btd.baselines.ood_ddpm:OODDDPM",
}


def available_baselines() -> list[str]:
    """Registered names, in the paper's table order."""
    return list(REGISTRY)


def baseline_class(name: str) -> type[Baseline]:
    """Import and return the class registered under `name` (BTDConfigError when unknown)."""
    if name not in REGISTRY:
        raise BTDConfigError(
            "baselines.name", f"unknown baseline {name!r}; known: {', '.join(REGISTRY)}"
        )
    module_name, _, class_name = REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BTDConfigError(
            "baselines.name", f"baseline {name!r} is not available ({exc})"
        ) from None
    cls = getattr(module, class_name, None) or _find_by_name(module, name)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Baseline)):
        raise BTDConfigError(
            "baselines.name", f"{REGISTRY[name]} is not a Baseline class (registry entry broken)"
        )
    return cls


def _find_by_name(module: Any, name: str) -> type[Baseline] | None:
    """Fallback when the class was renamed: the module's Baseline subclass whose `name` matches."""
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Baseline) and obj.name == name:
            return obj
    return None


def make_baseline(name: str, **params: Any) -> Baseline:
    """Build baseline `name` with `params`; unknown parameter names fail naming the field."""
    cls = baseline_class(name)
    sig = inspect.signature(cls.__init__)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        allowed = [p for p in sig.parameters if p != "self"]
        for key in params:
            if key not in allowed:
                raise BTDConfigError(
                    f"baselines.{name}.{key}",
                    f"unknown parameter; {name} takes {', '.join(allowed) or 'no parameters'}",
                )
    return cls(**params)
