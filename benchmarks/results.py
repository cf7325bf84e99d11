"""Helpers shared by the harnesses' result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with every ``str`` subclass (an enum member) turned into a plain ``str``.

    >>> from schemas.outputs import AlarmEvent
    >>> plain({"event": AlarmEvent.RAISED, "nested": {"n": 3}})
    {'event': 'raised', 'nested': {'n': 3}}
    """
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, str) else value


def write_results(out: Path, stem: str, results: Any, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out`` (created); their paths.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> [p.name for p in write_results(folder, "nab", {"score": 1.0}, "# NAB")]
    ['nab.json', 'nab.md']
    """
    out.mkdir(parents=True, exist_ok=True)
    data, text = out / f"{stem}.json", out / f"{stem}.md"
    data.write_text(json.dumps(results, indent=2) + "\n")
    text.write_text(markdown)
    return data, text
