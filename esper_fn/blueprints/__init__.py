"""The blueprint catalogue: versioned seed designs (``name@x.y.z``) with pydantic metadata.

Importing this package registers every built-in blueprint. Look one up with `get("lora_r8")`,
list them with `registry()`, add your own with `register(Blueprint(...))`.
"""

from .._blueprint import (Blueprint, BlueprintMeta, SeedOut, available_capabilities, get, offered, register, registry,
                          resolve)
# Registration side effect; the import order is the catalogue (registry) order, so new modules go last.
from . import _conv, _dense, _conv2d, _attention, _misc, _moe  # noqa: F401, I001

__all__ = ["Blueprint", "BlueprintMeta", "SeedOut", "available_capabilities", "get", "offered", "register", "registry",
           "resolve"]
