"""Controllers (installed as ``esper_fn.policies``): the GNN actor-critic and its PPO wiring land here.

The non-RL baselines (static, fixed schedule, plateau heuristic) live in `esper_fn.controllers`,
because the core grow loop uses them.
"""
