"""esper_fn: functional morphogenetic training.

Models are pure functions over TensorDict parameter trees; seeds are grafted into named slots,
blended in, fossilized or pruned, and every operation returns a new `State`.

    import esper_fn as ef
    host = ef.hosts.mlp((40, 16, 10))
    state = ef.init(host, optimizer=ef.optim.adam(1e-2), generator=torch.Generator().manual_seed(0))
    state = ef.germinate(state, "input", "conv1d_k5")
    state, metrics = ef.train_step(state, x, y)
"""

from . import blueprints, checkpoint, optim, report
from . import _host as hosts
from ._apply import INCUBATION, apply, train_step
from ._errors import (
    BlueprintError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    EsperError,
    GateError,
    GraftError,
    HostError,
    IllegalTransitionError,
    TaskError,
)
from ._export import GrownNetwork, export
from ._host import Host, SlotSpec, wrap
from ._lifecycle import CURVES, TRANSITIONS, GateConfig, Op, Stage, alpha_at, legal_ops
from ._state import State, advance, fossilize, germinate, init, legal_actions, prune, stack, tick, unstack

__version__ = "0.1.0"

__all__ = [
    "CURVES",
    "INCUBATION",
    "TRANSITIONS",
    "BlueprintError",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "EsperError",
    "GateConfig",
    "GateError",
    "GraftError",
    "GrownNetwork",
    "Host",
    "HostError",
    "IllegalTransitionError",
    "Op",
    "SlotSpec",
    "Stage",
    "State",
    "TaskError",
    "advance",
    "alpha_at",
    "apply",
    "blueprints",
    "export",
    "fossilize",
    "germinate",
    "hosts",
    "init",
    "legal_actions",
    "legal_ops",
    "optim",
    "prune",
    "stack",
    "tick",
    "train_step",
    "unstack",
    "wrap",
]
