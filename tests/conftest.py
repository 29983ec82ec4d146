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


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator; library code never touches the global RNG, so tests pass one in."""
    return torch.Generator().manual_seed(0)
