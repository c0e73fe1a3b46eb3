"""Plugins with no dependency beyond the core's, registered like any third-party plugin."""
