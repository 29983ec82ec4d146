import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile(
    "esper", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("esper")


REQUIRE_CUDA = os.environ.get("ESPER_FN_REQUIRE_CUDA") == "1"
"""Set by `make test-gpu`: the `device` fixture is CUDA only, and a machine without CUDA fails."""


def _device_params() -> list[str]:
    if REQUIRE_CUDA:
        return ["cuda"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_device_params())
def device(request) -> torch.device:
    """Every device this machine has: the CPU always, CUDA where available (`make test` on a CPU machine
    runs the device tests on the CPU with an explicit ``device="cpu"``); with ESPER_FN_REQUIRE_CUDA=1
    (`make test-gpu`) CUDA only, and its absence is a failure, not a skip."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.fail("ESPER_FN_REQUIRE_CUDA=1 (make test-gpu), but torch sees no CUDA device "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}).")
    return torch.device(request.param)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator; library code never touches the global RNG, so tests pass one in."""
    return torch.Generator().manual_seed(0)


class Crash(Exception):
    """Raised by `crash_at`'s hook: a run interrupted mid-epoch."""


@pytest.fixture
def crash_at():
    """``crash_at(n)`` -> an ``on_epoch_start`` hook for `esper_fn.run.grow` that raises `Crash` when
    epoch `n` starts (an interrupted run, to resume)."""

    def make(n: int):
        def hook(epoch, state):
            if epoch == n:
                raise Crash(f"crashed at epoch {n}")
            return state

        return hook

    make.error = Crash
    return make


@pytest.fixture
def nan_at():
    """``nan_at(n)`` -> an ``on_epoch_start`` hook for `esper_fn.run.grow` that fills the host's
    ``fc1`` weight with NaN when epoch `n` starts (a divergence the governor must roll back)."""
    from dataclasses import replace

    def make(n: int):
        def hook(epoch, state):
            if epoch != n:
                return state
            flat = dict(state.params_flat)
            k = ("host", "fc1", "weight")
            flat[k] = torch.full_like(flat[k], float("nan"))
            return replace(state, params_flat=flat, _cache={})

        return hook

    return make
