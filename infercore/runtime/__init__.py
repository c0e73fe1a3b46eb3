"""Builds the pipeline from validated config, starts and stops it, and runs requests."""

from infercore.runtime.runtime import Runtime, ServedModel, ServedVersion

__all__ = ["Runtime", "ServedModel", "ServedVersion"]
