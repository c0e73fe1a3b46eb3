"""infercore: turn a trained model into a production inference service from a recipe."""

from importlib.metadata import PackageNotFoundError, version

from infercore.hookspecs import hookimpl

try:
    __version__ = version("infercore")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
