"""Markdown reporting: tables, machine descriptions, and :func:`update_section`, the one writer of
the named sections of docs/RESULTS.md (commands and benchmarks each own theirs)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def cpu_description() -> str:
    """'<n>-core <CPU model>'."""
    import platform

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def machine_description() -> str:
    """'<n>-core <CPU model>, <k> torch threads': quoted next to any absolute time."""
    import torch

    return f"{cpu_description()}, {torch.get_num_threads()} torch threads"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table; floats formatted with ``floatfmt``, None shown as '–'."""

    def cell(x) -> str:
        if x is None:
            return "–"
        if isinstance(x, float):
            return format(x, floatfmt)
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``
    (appending the section if it is not there yet), writing atomically. Each benchmark or
    ``mixmap reproduce`` step owns its sections and leaves the rest of the file alone."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is for everyone to read
    os.replace(tmp, path)
