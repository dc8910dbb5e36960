"""JSON-lines logs (metrics, sample keys, job records): one JSON object per line, appended as a run goes.

A kill or a full disk in the middle of an append leaves a torn last line: it is dropped with a warning (it
was never complete, and the step it belongs to is trained again). Damage anywhere else is one error line
naming the file and the line. Rewrites (dropping the records a resume trains again) go through a temporary
file and a rename, so a crash during one leaves the old file whole.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pixelflow.errors import ConfigError

log = logging.getLogger(__name__)


def read_lines(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """((line, record) of every whole record, whether a torn last line was dropped); none when the file
    does not exist."""
    if not path.is_file():
        return [], False
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines):
                log.warning("%s: dropping its torn last line %d (a write cut short)", path, number)
                return out, True
            raise ConfigError(f"{path}:{number}: not a JSON record (damaged: mend or delete that line)") from None
        out.append((line, record))
    return out, False


def read_records(path: Path) -> list[dict]:
    return [record for _, record in read_lines(path)[0]]


def split_at_step(path: Path, step: int) -> list[str]:
    """Keep the records up to `step` (the file rewritten atomically when that changes it); returns the lines
    of the later ones."""
    lines, torn = read_lines(path)
    kept = [line for line, record in lines if record.get("step", 0) <= step]
    dropped = [line for line, record in lines if record.get("step", 0) > step]
    if dropped or torn:
        write_lines(path, kept)
    return dropped


def write_lines(path: Path, lines: list[str]) -> None:
    """Replace a JSON-lines file with these lines, atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
