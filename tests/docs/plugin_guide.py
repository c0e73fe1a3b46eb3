"""Reading docs/plugins.md: its fenced blocks, the files the tutorial writes, its sections.

Shared by the guide's tests (``tests/docs``), the tutorial's end-to-end test
(``tests/integration/test_new_plugin_tutorial.py``) and the meta-tests (``tests/unit``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"
TUTORIAL_HEADING = "Tutorial: a model loader for an in-house format"

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
_FILE = re.compile(r"^<!--\s*file:\s*(?P<path>\S+)\s*-->$")
_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.+?)\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of the guide.

    Attributes:
        lang: The fence's language (``python``, ``bash``, ``json`` …).
        code: The block's text, ending with a newline.
        line: The 1-based line of the opening fence.
        sections: The headings above it, outermost first.
        file: For a block preceded by ``<!-- file: PATH -->``: the file it is the content of.
    """

    lang: str
    code: str
    line: int
    sections: tuple[str, ...]
    file: str | None

    @property
    def name(self) -> str:
        return f"plugins.md:{self.line} ({self.sections[-1] if self.sections else 'top'})"

    def within(self, heading: str) -> bool:
        return heading in self.sections


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block, in document order."""
    lines = (GUIDE.read_text() if text is None else text).splitlines()
    out: list[Block] = []
    headings: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group("hashes"))
            headings = [h for h in headings if h[0] < level] + [(level, heading.group("title"))]
        fence = _FENCE.match(line)
        if fence and fence.group("lang") is not None:
            start = i
            j = i + 1
            while j < len(lines) and lines[j] != "```":
                j += 1
            previous = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            marker = _FILE.match(previous.strip())
            out.append(
                Block(
                    lang=fence.group("lang"),
                    code="\n".join(lines[start + 1 : j]) + "\n",
                    line=start + 1,
                    sections=tuple(title for _, title in headings),
                    file=marker.group("path") if marker else None,
                )
            )
            i = j + 1
            continue
        i += 1
    return out


def section(heading: str, text: str | None = None) -> str:
    """The text under a heading (any level), up to the next heading of the same or a higher
    level; empty when there is no such heading."""
    lines = (GUIDE.read_text() if text is None else text).splitlines()
    out: list[str] = []
    level: int | None = None
    in_fence = False
    for line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match:
            this = len(match.group("hashes"))
            if level is not None and this <= level:
                break
            if level is None and match.group("title") == heading:
                level = this
                continue
        if level is not None:
            out.append(line)
    return "\n".join(out)
