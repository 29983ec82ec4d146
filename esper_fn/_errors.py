"""The error hierarchy. Every error esper_fn raises is an `EsperError`.

Each subclass also inherits the matching built-in, so both `except EsperError` and
`except ValueError` (or `pytest.raises(ValueError)`) work.
"""

from __future__ import annotations


class EsperError(Exception):
    """Root of every error esper_fn raises."""


class IllegalTransitionError(EsperError, ValueError):
    """A lifecycle operation was requested from a stage where the transition table forbids it."""


class GraftError(EsperError, ValueError):
    """A seed cannot be grafted, merged or removed (wrong slot, shape mismatch, ...)."""


class BlueprintError(EsperError, ValueError):
    """A blueprint is unknown, malformed, or does not fit the slot it was asked for."""


class HostError(EsperError, ValueError):
    """A host cannot be built or wrapped as asked (unknown submodule name or type, ...)."""


class GateError(EsperError, ValueError):
    """A lifecycle gate refused a transition; the message names the failed condition."""


class CapabilityError(EsperError, RuntimeError):
    """A blueprint needs a capability (e.g. a GPU feature) that this machine lacks."""


class CheckpointError(EsperError, OSError):
    """A checkpoint is missing, corrupt, or does not match what is being restored."""


class ConfigError(EsperError, ValueError):
    """A configuration file or value is invalid."""


class TaskError(EsperError, ValueError):
    """A task (data set) was asked for with invalid arguments."""


class EventLogError(EsperError, OSError):
    """An event log is missing, corrupt (malformed or truncated line), closed, or given a non-event."""


class RunDirError(EsperError, FileNotFoundError):
    """A directory is not a run directory (it lacks the files `esper-fn grow` writes)."""


class RunExistsError(ConfigError):
    """A run directory already holds a run, and the command would mix a second one into it."""


class RunWriteError(EsperError, OSError):
    """A run directory cannot be written (a read-only file system, no space, no permission)."""


__all__ = [
    "BlueprintError",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "EsperError",
    "EventLogError",
    "GateError",
    "GraftError",
    "HostError",
    "IllegalTransitionError",
    "RunDirError",
    "RunExistsError",
    "RunWriteError",
    "TaskError",
]


class LibraryError(EsperError, OSError):
    """A seed library (`esper_fn.urza`) is missing, unreadable or corrupt: its index, or an artifact
    whose size, SHA-256 or tensors differ from what the index recorded."""


class LibraryNotFoundError(LibraryError, FileNotFoundError):
    """There is no seed library at the path given."""


class SeedNotFoundError(LibraryError, LookupError):
    """A seed library holds no entry with the requested id (or an id prefix matches several)."""


class WarmStartError(GraftError):
    """A stored seed cannot warm-start a slot: its blueprint differs or its tensors do not fit."""


class CompileError(EsperError, RuntimeError):
    """A train step could not be compiled (`esper_fn.tezzeret`), or a kernel was asked for outside
    what it was compiled for."""


__all__ += ["CompileError", "LibraryError", "SeedNotFoundError", "WarmStartError"]


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint holds a NaN or an infinity in a parameter, buffer or optimizer moment.

    Attributes:
        key: the checkpoint key of the first such tensor, e.g. ``"params/host/fc1/weight"``.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # keep `key` through pickling (e.g. out of a worker process)
        return type(self), (str(self), self.key)


class MissingTelemetryError(GateError):
    """A lifecycle gate whose threshold is active cannot find its measurement in the telemetry
    (the key is absent or misspelled); the gate refuses rather than pass blind."""


class DonatedStateError(EsperError, RuntimeError):
    """A state whose tensors were donated (`train_step(..., donate=True)`) was used again."""


__all__ += ["DonatedStateError", "MissingTelemetryError", "NonFiniteCheckpointError"]


class SculptError(EsperError, ValueError):
    """A sculpt (`esper_fn.sculpt`) was asked of something it cannot shrink: an unknown slot, a live
    (unfossilized) seed, a layer whose units another seed reads, or a `keep` out of range."""


__all__ += ["SculptError"]
