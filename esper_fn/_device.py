"""Device and dtype arguments: one check for every place that creates data or state.

`esper_fn.init`, `State.to`, `esper_fn.tasks.load`, `Task.to`, `CheckpointManager.restore_state`
and `esper-fn grow --device` take a device ("cpu", "cuda", "cuda:1", "meta", a `torch.device`) and
some a floating-point dtype; these helpers turn a bad one into a typed error before any tensor moves.
"""

from __future__ import annotations

import torch

from ._errors import CapabilityError, ConfigError

__all__ = ["check_device", "check_float_dtype"]


def check_device(device: torch.device | str | None, what: str) -> torch.device | None:
    """`device` as a `torch.device` (None stays None), checked to exist on this machine.

    Args:
        device: "cpu", "cuda", "cuda:<i>", "mps", "meta", a `torch.device`, or None.
        what: the operation, for the message (e.g. "init").

    Raises:
        ConfigError: `device` is not a device name.
        CapabilityError: a CUDA (or MPS) device this machine does not have.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what}: {device!r} is not a device; use 'cpu', 'cuda', 'cuda:<index>', 'mps' or 'meta'."
                          ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CapabilityError(f"{what}: device {str(dev)!r} asked for, but this machine has no usable CUDA device "
                                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Use device='cpu', "
                                  "or run on a machine with a GPU and a CUDA build of torch.")
        if dev.index is not None and dev.index >= n:
            raise CapabilityError(f"{what}: device {str(dev)!r} asked for, but this machine has {n} CUDA device(s) "
                                  f"(cuda:0 to cuda:{n - 1}).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CapabilityError(f"{what}: device 'mps' asked for, but MPS is not available here. Use device='cpu'.")
    return dev


def check_float_dtype(dtype: torch.dtype | None, what: str) -> torch.dtype | None:
    """`dtype` if it is None or a floating-point `torch.dtype`.

    Raises:
        ConfigError: anything else (integer tensors, such as step counts and slot records, keep
            their own dtypes).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"{what}: dtype must be a floating-point torch.dtype (torch.float32, torch.float64, "
                          f"torch.bfloat16, ...), got {dtype!r}; integer tensors (labels, step counts, slot records) "
                          "keep their own dtypes.")
    return dtype
