"""Client-supplied names in error messages, bounded.

A request may carry any number of names (tensor inputs, V1 fields), each of any length: an
error that listed them all would echo the request back (20,000 unknown input names made a
6.2 MB 400 body). Each name is shown as :func:`~infercore.runtime.errors.quoted` shows a model
name from a URL (cut past 64 characters), and a list stops after a few.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Names of a list shown in an error message; the rest are counted.
SHOWN_NAMES = 10


def listed(names: Iterable[str], limit: int = SHOWN_NAMES) -> str:
    """``'a', 'b', 'c'``, or ``'a', 'b', … and 19998 more`` past ``limit`` names."""
    # Imported here, on the error path: the runtime package imports this one's siblings.
    from infercore.runtime.errors import quoted

    items = list(names)
    shown = ", ".join(quoted(str(n)) for n in items[:limit])
    if len(items) > limit:
        return f"{shown}, … and {len(items) - limit} more"
    return shown
