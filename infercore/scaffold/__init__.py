"""``infercore new-plugin``: generate a plugin distribution ready to edit, install and test.

:func:`new_plugin` writes ``infercore-NAME/`` (a pyproject with the ``infercore`` entry point,
``src/infercore_NAME/`` with the hook and a typed component with its ``Config``, a test that
uses :mod:`infercore.testing`, a README naming the options, ``py.typed``). The templates live in
``templates/`` beside this module.
"""

from infercore.scaffold.generate import (
    ROLES,
    PluginNames,
    ScaffoldError,
    new_plugin,
    plugin_names,
)

__all__ = ["ROLES", "PluginNames", "ScaffoldError", "new_plugin", "plugin_names"]
