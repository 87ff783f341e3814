"""Atomic JSON files and append-only JSON-lines files that survive kill -9."""

from __future__ import annotations

import json
import logging
import os


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj, **kw) -> str:
    return json.dumps(obj, default=_default, **kw)


def write_json(path: str, obj) -> None:
    """Writes atomically: a reader (or a crash) never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps(obj, indent=2, sort_keys=True))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file; a truncated last line (kill -9 mid-write) is dropped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the last line may be partial
                logging.getLogger("jaxrepro").warning(
                    "%s:%d: the last line is truncated (not a whole JSON row): read up to "
                    "the last whole row (%d rows)",
                    path,
                    i + 1,
                    len(rows),
                )
                break
            raise
    return rows


def write_jsonl(path: str, rows) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
