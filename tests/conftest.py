from __future__ import annotations

import pytest

from infercore.testing import fake_model_config


@pytest.fixture
def fake_config():
    return fake_model_config
