"""TorchRL environments over the functional core (installed as ``esper_fn.envs``).

The batched `MorphogenesisEnv` lands here next (see SPEC.md, "The environment and the controller").
"""
