"""Two runs' metric rows side by side: which rows match, and are they the same bits.

One place for what every comparison of trajectories needs (the audit's runs, a replay
against its original, a JAX run against the PyTorch reference): a row's identity
(:func:`row_key`), the pairing of two runs' rows (:func:`pairs`), whether two rows are
bitwise the same (:func:`differing_fields`), and a bitwise verdict over a window of steps
that counts rows missing on either side (:func:`compare`) rather than skipping them: a
replay that stopped early is not "bit for bit".
"""

from __future__ import annotations

import math
import struct

KEY_FIELDS = ("kind", "step", "phase", "split")


def row_key(row: dict) -> tuple:
    """What makes a row the same row in two runs: (kind, step, phase, split)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same_value(a, b) -> bool:
    """Bitwise equality of two logged values: floats by their bits (so -0.0 is not 0.0),
    any NaN equals any NaN (JSON keeps no payload), the rest by ``==`` and type."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return _bits(a) == _bits(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def differing_fields(a: dict, b: dict) -> list[str]:
    """The fields, other than the key, in which row ``a`` and row ``b`` differ (sorted).

    A field that only one row has is a difference. Empty: the rows are the same bits.
    """
    fields = sorted((set(a) | set(b)) - set(KEY_FIELDS))
    return [k for k in fields if k not in a or k not in b or not same_value(a[k], b[k])]


def pairs(rows_a: list[dict], rows_b: list[dict]) -> list[tuple[dict, dict]]:
    """The rows both runs have, matched by :func:`row_key`, in ``rows_a``'s order."""
    other = {row_key(r): r for r in rows_b}
    return [(r, other[row_key(r)]) for r in rows_a if row_key(r) in other]


def _order(row: dict) -> tuple:
    """Rows of a step in the order the engine writes them: evals, then the train row."""
    return row["step"], row["kind"] != "eval"


def _where(row: dict) -> dict:
    return {
        "step": row["step"],
        "kind": row["kind"],
        "phase": row["phase"],
        "split": row.get("split"),
    }


def window(reference: list[dict], *, start: int = 0, until: int | None = None):
    """Which of the reference's rows the other run must have: ``(in_window, boundary)``.

    ``in_window(row)``: from step ``start`` up to the reference's last step, and when
    ``until`` is given (a branch that stops there) train rows before ``until`` and eval
    rows up to it. ``boundary(row)``: an eval row at a branch's ends, which only one side
    may legitimately have, compared where both do: at ``start`` > 0 (the original also
    evaluated the previous phase there when ``start`` is a phase boundary; a branch
    restored into the new phase does not) and at an ``until`` before the reference's end
    (the branch evaluates where it stops; the original only if an eval was due there).
    """
    steps = [r["step"] for r in reference if r["step"] >= start]
    last = max(steps, default=start)
    cut = until is not None and until < last

    def in_window(row) -> bool:
        s = row["step"]
        if s < start or s > last:
            return False
        if until is not None and row["kind"] != "eval" and s >= until:
            return False
        return not (cut and s > until)

    def boundary(row) -> bool:
        if row["kind"] != "eval":
            return False
        return (start > 0 and row["step"] == start) or (cut and row["step"] == until)

    return in_window, boundary


def compare(reference: list[dict], other: list[dict], *, start: int = 0, until=None) -> dict:
    """Per-row bitwise comparison of ``other`` with ``reference`` from step ``start`` on.

    The window is :func:`window`'s: every reference row in it must be in ``other`` and the
    same bits, and ``other`` may have no row in it that the reference lacks. Rows before
    ``start`` and after the window are not compared (a branch's history, or steps the
    reference never recorded).

    Returns:
      ``compared_rows``, ``missing_rows`` (the reference's rows that ``other`` lacks),
      ``extra_rows`` (``other``'s rows that the reference lacks), ``bitwise_equal`` (rows
      compared, none differs, none missing or extra), ``first_difference`` (the earliest
      such row: ``{"step", "kind", "phase", "split", "problem": "differs" | "missing" |
      "extra"}``, with ``fields`` when it differs) and ``steps`` (one entry per compared
      row).
    """
    in_window, boundary = window(reference, start=start, until=until)
    ref = [r for r in reference if in_window(r)]
    mine = [r for r in other if in_window(r)]
    ref_keys, my_keys = {row_key(r) for r in ref}, {row_key(r) for r in mine}
    missing = [r for r in ref if row_key(r) not in my_keys and not boundary(r)]
    extra = [r for r in mine if row_key(r) not in ref_keys and not boundary(r)]
    steps, problems = [], []
    for theirs, row in pairs(ref, mine):
        differing = differing_fields(theirs, row)
        steps.append(
            dict(
                _where(row),
                equal=not differing,
                differing=differing,
                original={k: theirs.get(k) for k in ("loss", "accuracy")},
                replayed={k: row.get(k) for k in ("loss", "accuracy")},
            )
        )
        if differing:
            problems.append((row, dict(_where(row), problem="differs", fields=differing)))
    problems += [(r, dict(_where(r), problem="missing")) for r in missing]
    problems += [(r, dict(_where(r), problem="extra")) for r in extra]
    first = min(problems, key=lambda p: _order(p[0]))[1] if problems else None
    return {
        "compared_rows": len(steps),
        "missing_rows": [_where(r) for r in missing],
        "extra_rows": [_where(r) for r in extra],
        "bitwise_equal": bool(steps) and not problems,
        "first_difference": first,
        "steps": steps,
    }


def describe(difference: dict | None, names=("original", "replay")) -> str:
    """One line for a ``first_difference``, e.g. ``train row at pretrain step 7 differs in
    loss`` or ``eval source_test row at finetune step 14: in the original, not in the
    replay`` (``names``: the reference's and the other run's)."""
    if difference is None:
        return "no difference"
    split = f" {difference['split']}" if difference.get("split") else ""
    phase = f"{difference['phase']} " if difference.get("phase") else ""
    what = f"{difference['kind']}{split} row at {phase}step {difference['step']}"
    problem = difference.get("problem", "differs")
    if problem == "differs":
        return f"{what} differs in {', '.join(difference.get('fields', []))}"
    have, lack = names if problem == "missing" else names[::-1]
    return f"{what}: in the {have}, not in the {lack}"
