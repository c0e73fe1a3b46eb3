from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from infercore.testing import fake_model_config

# The fuzz tests that drive a whole app or server (API, admin, fraud's transactions): the same
# examples every run (a failure names its input and reproduces), no example database, no
# per-example deadline and no health checks (each example is an HTTP round trip, and the
# strategies filter hard). Each test sets its own max_examples on top:
# ``@settings(settings.get_profile("fuzz"), max_examples=200)``.
settings.register_profile(
    "fuzz",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def fake_config():
    return fake_model_config
