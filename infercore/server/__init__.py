"""The Litestar app: controllers, error mapping, metrics."""

from infercore.server.app import create_app

__all__ = ["create_app"]
