"""TorchRL environments over the functional core (installed as ``esper_fn.envs``).

`MorphogenesisEnv` runs N host trainings in lockstep as one batched TorchRL environment: one step is
one epoch of every row (`esper_fn.episode.step`, the step `esper-fn grow` drives too), the action
one lifecycle request per row. `Observer` is its observation as a pure function of episodes;
`PolicyController` runs a trained policy in ``esper-fn grow``. Keys, shapes, features, action layout
and reward formulas: docs/env.md.
"""

from esper_fn.actions import ActionSpace, FlatAction, IllegalActionError

from . import rewards
from ._env import Context, EnvStateError, MorphogenesisEnv
from ._features import GLOBAL_FEATURES, LAYER_FEATURES, NODE_FEATURES, SLOT_FEATURES
from ._grow import PolicyController, tamiyo_controller
from ._observe import METRIC_KEYS, Observer
from ._ray import MissingExtraError, ray_collector
from .rewards import Reward, RewardInputs

__all__ = [
    "GLOBAL_FEATURES",
    "LAYER_FEATURES",
    "METRIC_KEYS",
    "NODE_FEATURES",
    "SLOT_FEATURES",
    "ActionSpace",
    "Context",
    "EnvStateError",
    "FlatAction",
    "IllegalActionError",
    "MissingExtraError",
    "MorphogenesisEnv",
    "Observer",
    "PolicyController",
    "Reward",
    "RewardInputs",
    "ray_collector",
    "rewards",
    "tamiyo_controller",
]
