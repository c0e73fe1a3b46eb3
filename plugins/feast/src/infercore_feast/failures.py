"""What a Feast or Redis failure says, made fit for one line of an error or a log (S6).

redis-py's pipelines put the failed command into the error's text (``Command # 1 (HMGET
<entity key bytes> ...) of pipeline caused error: ...``): Feast's serialized entity keys, binary,
with the entity's id in them. :func:`clean` keeps the error after it. Two failures get words of
their own, as their raw text misleads: a Redis server that requires a password the URL does not
give (:func:`redis_needs_auth`; with a big command Redis answers ``Protocol error:
unauthenticated multibulk length``, which never says "password"), and a Feast registry file
that is not a registry (:func:`corrupt_registry`).
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator

#: The longest text of a failure an error line or a log line carries.
MAX_CHARS = 300

# Greedy: the command's bytes may hold anything, the error after it comes last.
_PIPELINE_COMMAND = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)

#: A Redis server's answers to a client that has not authenticated: ``NOAUTH Authentication
#: required.`` (redis-py's AuthenticationError drops the ``NOAUTH``), and, for a command with
#: more than a few arguments or a long one, the protocol errors Redis 7 answers before it.
_NEEDS_AUTH = re.compile(
    r"\bNOAUTH\b|\bauthentication required\b|\bunauthenticated (?:multi)?bulk length\b",
    re.IGNORECASE,
)

_REGISTRY_CODE = f"{os.sep}feast{os.sep}infra{os.sep}registry{os.sep}"


def clean(text: str) -> str:
    """``text`` on one line, at most :data:`MAX_CHARS` long: without a Redis pipeline's
    command (entity keys), and with each run of characters that do not print (binary data,
    control characters, U+FFFD from bytes that were not UTF-8) as one ``?``."""
    text = _PIPELINE_COMMAND.sub("", text)
    out: list[str] = []
    for char in " ".join(text.split()):
        if char.isprintable() and char != "\ufffd":
            out.append(char)
        elif not out or out[-1] != "?":
            out.append("?")
    return "".join(out)[:MAX_CHARS]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (a few at most)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def redis_needs_auth(exc: BaseException) -> bool:
    """Whether ``exc`` is (or comes from) a Redis server refusing an unauthenticated client.

    A wrong password is not this: Redis answers that one ``WRONGPASS invalid username-password
    pair``, which says what it is.
    """
    return any(
        type(e).__module__.split(".")[0] == "redis" and _NEEDS_AUTH.search(clean(str(e)))
        for e in _chain(exc)
    )


def corrupt_registry(exc: BaseException) -> bool:
    """Whether ``exc`` is (or comes from) protobuf failing to parse Feast's registry file."""
    for e in _chain(exc):
        if not any(
            cls.__name__ == "DecodeError" and cls.__module__.startswith("google.protobuf")
            for cls in type(e).__mro__
        ):
            continue
        if "feast.core.Registry" in str(e):
            return True
        # protobuf's pure-Python parser does not name the message type: where it was parsed.
        if any(
            _REGISTRY_CODE in frame.f_code.co_filename
            for frame, _ in traceback.walk_tb(e.__traceback__)
        ):
            return True
    return False
