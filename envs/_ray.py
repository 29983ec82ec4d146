"""Scale-out: collect from `MorphogenesisEnv` workers with TorchRL's `RayCollector` (extra `esper_fn[ray]`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from esper_fn import EsperError

__all__ = ["MissingExtraError", "ray_collector"]


class MissingExtraError(EsperError, ImportError):
    """An optional dependency is not installed."""


def ray_collector(
    make_env: Callable[[], Any],
    policy: Callable,
    *,
    frames_per_batch: int,
    total_frames: int = -1,
    num_workers: int = 2,
    ray_init_config: dict[str, Any] | None = None,
    num_cpus_per_worker: float = 1,
    sync: bool = True,
    **collector_kwargs,
):
    """A `torchrl.collectors.distributed.RayCollector` over `num_workers` processes, each holding one
    batched env built by `make_env` (a picklable callable, e.g. ``functools.partial(MorphogenesisEnv,
    ...)``) and running `policy` on it.

    Args:
        make_env: builds the env in each worker.
        policy: a TorchRL policy (``TensorDictModule``, or a callable ``td -> td``) that reads the
            env's observation keys and writes ``"action"``.
        frames_per_batch: frames (env steps x rows) per yielded batch.
        total_frames: frames to collect in all (-1: until `shutdown`).
        num_workers: remote collectors (Ray actors).
        ray_init_config: ``ray.init`` keyword arguments; ``{"address": "ray://head:10001"}`` joins a
            cluster. Default: a local Ray instance with `num_workers` CPUs.
        num_cpus_per_worker: CPUs Ray reserves for each collector actor.
        sync: gather every worker's frames into each batch (True) or yield batches as they come.
        **collector_kwargs: passed to `RayCollector` (e.g. ``collector_kwargs=...``, ``postproc=...``).

    Returns:
        The collector, with the workers' policies synchronised to `policy`'s weights. Iterate it
        for batches (``for batch in collector``: ``len(collector)`` fails in torchrl 0.14.1), call
        ``collector.update_policy_weights_(policy)`` after each optimiser step, and ``shutdown()``
        at the end.

    Raises:
        MissingExtraError: ray is not installed (``pip install 'esper_fn[ray]'``).
    """
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("ray_collector needs ray: pip install 'esper_fn[ray]'.") from e
    with warnings.catch_warnings():
        # torchrl 0.14.1 warns about its own VanillaWeightUpdater while importing its collectors.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchrl.collectors.distributed import RayCollector

    init = dict(ray_init_config) if ray_init_config is not None else {
        "num_cpus": max(1, int(num_workers * num_cpus_per_worker)), "include_dashboard": False,
        "log_to_driver": False}
    collector = RayCollector(
        [make_env] * num_workers,
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=total_frames,
        ray_init_config=init,
        remote_configs={"num_cpus": num_cpus_per_worker, "num_gpus": 0, "memory": 2 * 1024**3},
        sync=sync,
        **collector_kwargs,
    )
    # Workers start from the policy's current weights; after each optimiser step call
    # ``collector.update_policy_weights_(policy)`` again.
    collector.update_policy_weights_(policy)
    return collector
