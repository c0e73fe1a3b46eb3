"""Fixtures and hooks of the feast plugin's tests; the helpers are in feast_test_support."""

from feast_test_support import model_root, pytest_configure, redis_process

__all__ = ["model_root", "pytest_configure", "redis_process"]
