"""The blueprint catalogue: versioned seed designs (``name@x.y.z``) with pydantic metadata.

Importing this package registers every built-in blueprint. Look one up with `get("lora_r8")`,
list them with `registry()`, add your own with `register(Blueprint(...))`.
"""

from .._blueprint import Blueprint, BlueprintMeta, SeedOut, available_capabilities, get, register, registry
from . import _conv, _dense  # noqa: F401  (registration side effect)

__all__ = ["Blueprint", "BlueprintMeta", "SeedOut", "available_capabilities", "get", "register", "registry"]
