"""esper_fn: functional morphogenetic training.

Models are pure functions over TensorDict parameter trees; seeds are grafted into named slots,
blended in, fossilized or pruned, and every operation returns a new `State`.

    import esper_fn as ef
    host = ef.hosts.mlp((40, 16, 10))
    state = ef.init(host, optimizer=ef.optim.adam(1e-2), generator=torch.Generator().manual_seed(0))
    state = ef.germinate(state, "input", "conv1d_k5")
    state, metrics = ef.train_step(state, x, y)

Every public name is loaded on first use (PEP 562 module ``__getattr__``): ``import esper_fn`` is
cheap and does not import torch, so the ``esper-fn`` command (`esper_fn.cli`) parses its arguments
before paying for torch. ``ef.germinate`` and ``from esper_fn import germinate`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (submodule, attribute in it; None for the submodule itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "CURVES": ("._lifecycle", "CURVES"),
    "INCUBATION": ("._apply", "INCUBATION"),
    "LIVE_STAGES": ("._lifecycle", "LIVE_STAGES"),
    "TRANSITIONS": ("._lifecycle", "TRANSITIONS"),
    "BlueprintError": ("._errors", "BlueprintError"),
    "CapabilityError": ("._errors", "CapabilityError"),
    "CheckpointError": ("._errors", "CheckpointError"),
    "ConfigError": ("._errors", "ConfigError"),
    "EsperError": ("._errors", "EsperError"),
    "GateConfig": ("._lifecycle", "GateConfig"),
    "GateError": ("._errors", "GateError"),
    "GraftError": ("._errors", "GraftError"),
    "GrownNetwork": ("._export", "GrownNetwork"),
    "Graft": ("._modules", "Graft"),
    "SeedFn": ("._export", "SeedFn"),
    "Host": ("._host", "Host"),
    "HostError": ("._errors", "HostError"),
    "IllegalTransitionError": ("._errors", "IllegalTransitionError"),
    "Op": ("._lifecycle", "Op"),
    "SlotSpec": ("._host", "SlotSpec"),
    "Stage": ("._lifecycle", "Stage"),
    "State": ("._state", "State"),
    "TaskError": ("._errors", "TaskError"),
    "advance": ("._state", "advance"),
    "alpha_at": ("._lifecycle", "alpha_at"),
    "apply": ("._apply", "apply"),
    "blueprints": (".blueprints", None),
    "export": ("._export", "export"),
    "fossilize": ("._state", "fossilize"),
    "germinate": ("._state", "germinate"),
    "hosts": ("._host", None),
    "init": ("._state", "init"),
    "legal_actions": ("._state", "legal_actions"),
    "legal_ops": ("._lifecycle", "legal_ops"),
    "optim": (".optim", None),
    "partition": ("._state", "partition"),
    "prune": ("._state", "prune"),
    "stack": ("._state", "stack"),
    "structure": ("._state", "structure"),
    "tick": ("._state", "tick"),
    "train_step": ("._apply", "train_step"),
    "unstack": ("._state", "unstack"),
    "wrap": ("._host", "wrap"),
    "CompileError": ("._errors", "CompileError"),
    "LibraryError": ("._errors", "LibraryError"),
    "SeedNotFoundError": ("._errors", "SeedNotFoundError"),
    "LibraryNotFoundError": ("._errors", "LibraryNotFoundError"),
    "WarmStartError": ("._errors", "WarmStartError"),
    "RunDirError": ("._errors", "RunDirError"),
    "RunExistsError": ("._errors", "RunExistsError"),
    "RunWriteError": ("._errors", "RunWriteError"),
    "SculptError": ("._errors", "SculptError"),
    "SculptReport": (".emrakul", "SculptReport"),
    "sculpt": (".emrakul", "sculpt"),
    "sculptable": (".emrakul", "sculptable"),
    "DonatedStateError": ("._errors", "DonatedStateError"),
    "MissingTelemetryError": ("._errors", "MissingTelemetryError"),
    "NonFiniteCheckpointError": ("._errors", "NonFiniteCheckpointError"),
    "state_from_tensors": ("._serialize", "state_from_tensors"),
    "state_to_tensors": ("._serialize", "state_to_tensors"),
}

# Submodules that are not in __all__ but were importable as attributes (`ef.checkpoint`, `ef.report`).
_SUBMODULES = ("checkpoint", "report", "run", "tasks", "training", "controllers", "events", "cli", "urza", "tezzeret",
               "episode", "actions", "emrakul", "karn")

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        if module != "._errors":
            # The core needs the blueprint catalogue registered before any seed is grafted or run,
            # exactly as the eager `import esper_fn` did; importing it also imports torch.
            importlib.import_module(".blueprints", __name__)
        mod = importlib.import_module(module, __name__)
        value = mod if attr is None else getattr(mod, attr)
    elif name in _SUBMODULES:
        if name != "cli":
            importlib.import_module(".blueprints", __name__)
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'esper_fn' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from . import _host as hosts
    from . import blueprints, checkpoint, karn, optim, report, tezzeret, urza
    from ._apply import INCUBATION, apply, train_step
    from ._errors import (
        BlueprintError,
        CapabilityError,
        CheckpointError,
        CompileError,
        ConfigError,
        DonatedStateError,
        EsperError,
        GateError,
        GraftError,
        HostError,
        IllegalTransitionError,
        LibraryError,
        LibraryNotFoundError,
        RunDirError,
        RunExistsError,
        RunWriteError,
        SculptError,
        MissingTelemetryError,
        NonFiniteCheckpointError,
        SeedNotFoundError,
        TaskError,
        WarmStartError,
    )
    from ._export import GrownNetwork, SeedFn, export
    from ._modules import Graft
    from ._host import Host, SlotSpec, wrap
    from ._lifecycle import CURVES, TRANSITIONS, GateConfig, Op, Stage, alpha_at, legal_ops
    from ._serialize import state_from_tensors, state_to_tensors
    from .emrakul import SculptReport, sculpt, sculptable
    from ._state import (
        State,
        advance,
        fossilize,
        germinate,
        init,
        legal_actions,
        partition,
        prune,
        stack,
        structure,
        tick,
        unstack,
    )
