"""TorchRL environments over the functional core (installed as ``esper_fn.envs``).

`MorphogenesisEnv` runs N host trainings in lockstep as one batched TorchRL environment: one step is
one epoch of every row, the action one lifecycle request per row. Keys, shapes, features, action
layout and reward formulas: docs/env.md.
"""

from . import _rewards as rewards
from ._actions import ActionSpace, EnvStateError, FlatAction, IllegalActionError
from ._controller import ControllerPolicy
from ._env import Context, MorphogenesisEnv, run_streams
from ._grow import PolicyController
from ._features import GLOBAL_FEATURES, LAYER_FEATURES, NODE_FEATURES, SLOT_FEATURES
from ._ray import MissingExtraError, ray_collector
from ._rewards import Reward, RewardInputs

__all__ = [
    "GLOBAL_FEATURES",
    "LAYER_FEATURES",
    "NODE_FEATURES",
    "SLOT_FEATURES",
    "ActionSpace",
    "Context",
    "ControllerPolicy",
    "FlatAction",
    "EnvStateError",
    "IllegalActionError",
    "MissingExtraError",
    "MorphogenesisEnv",
    "PolicyController",
    "Reward",
    "RewardInputs",
    "ray_collector",
    "rewards",
    "run_streams",
]
