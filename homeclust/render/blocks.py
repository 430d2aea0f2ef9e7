"""Managed blocks: homeclust's own lines inside a file that other people edit too (pure).

``authorized_keys``, ``ssh_known_hosts``, ``ssh_config`` and Open MPI's
parameter file belong to the admin and the distribution as much as to
homeclust.  homeclust owns exactly the lines between its BEGIN and END
markers and never changes a line outside them: the block is replaced where it
stands, or appended (after a newline, when the file's last line has none).
"""

from __future__ import annotations

from collections.abc import Sequence


class BlockError(ValueError):
    """The file's markers are broken (a BEGIN without its END, or two blocks)."""


def split_block(text: str | None, begin: str, end: str
                ) -> tuple[list[str], list[str] | None, list[str]]:
    """(lines before, lines inside or None when there is no block, lines after)."""
    lines = (text or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    if not starts:
        return lines, None, []
    if len(starts) > 1:
        raise BlockError(f"the marker line {begin!r} appears {len(starts)} times")
    start = starts[0]
    for stop in range(start + 1, len(lines)):
        if lines[stop].strip() == end:
            return lines[:start], lines[start + 1:stop], lines[stop + 1:]
        if lines[stop].strip() == begin:
            break
    raise BlockError(f"the marker line {begin!r} has no {end!r} after it")


def block_body(text: str | None, begin: str, end: str) -> list[str] | None:
    """The lines of the managed block (None: the file has none)."""
    return split_block(text, begin, end)[1]


def replace_block(text: str | None, begin: str, end: str, body: Sequence[str]) -> str:
    """``text`` with the block between ``begin`` and ``end`` holding ``body``.

    Everything outside the block is kept byte for byte, except that a missing
    final newline is added before a block appended at the end.
    """
    before, inside, after = split_block(text, begin, end)
    block = [begin, *body, end]
    if inside is None:
        current = text or ""
        if current and not current.endswith("\n"):
            current += "\n"
        return current + "\n".join(block) + "\n"
    out = "\n".join([*before, *block, *after]) + "\n"
    return out


def remove_block(text: str | None, begin: str, end: str) -> str:
    """``text`` without the block between ``begin`` and ``end`` (every other line kept)."""
    before, inside, after = split_block(text, begin, end)
    if inside is None:
        return text or ""
    lines = [*before, *after]
    return "\n".join(lines) + "\n" if lines else ""
