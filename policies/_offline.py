"""Offline datasets: rollouts saved as a TorchRL replay buffer on memory-mapped storage.

`save_rollouts` writes transitions (any batch shape; flattened to one dimension) into a
`TensorDictReplayBuffer` over `LazyMemmapStorage` and dumps it to a directory; `load_rollouts`
reads it back (memory-mapped, so a large dataset is not loaded into RAM) for offline training or
analysis. Sampling is then the buffer's: ``buffer.sample(batch_size)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensordict import TensorDictBase
from torchrl.data import LazyMemmapStorage, TensorDictReplayBuffer

__all__ = ["load_rollouts", "save_rollouts"]

_META = "rollouts.json"


def save_rollouts(data: TensorDictBase, path: str | Path) -> TensorDictReplayBuffer:
    """Save transitions as a memory-mapped replay buffer.

    Args:
        data: transitions, e.g. a collector batch ``[N, T]`` (flattened to ``[N * T]``; keep
            ``("collector", "traj_ids")`` or a seed key to regroup episodes).
        path: a directory (created; an existing dump there is replaced).

    Returns:
        The buffer (its storage lives under ``path/storage``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = data.reshape(-1)
    rb = TensorDictReplayBuffer(storage=LazyMemmapStorage(flat.shape[0], scratch_dir=path / "scratch"))
    rb.extend(flat)
    rb.dumps(path / "buffer")
    (path / _META).write_text(json.dumps({"size": int(flat.shape[0]), "shape": list(data.shape)}))
    return rb


def load_rollouts(path: str | Path) -> TensorDictReplayBuffer:
    """Load a buffer written by `save_rollouts`.

    Raises:
        FileNotFoundError: no dump at `path`.
    """
    path = Path(path)
    meta = path / _META
    if not meta.is_file():
        raise FileNotFoundError(f"no rollouts saved at {path} (expected {meta}).")
    size = json.loads(meta.read_text())["size"]
    rb = TensorDictReplayBuffer(storage=LazyMemmapStorage(size))
    rb.loads(path / "buffer")
    return rb
