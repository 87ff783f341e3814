"""From arms' outcomes to a verdict, with the rule written out.

For each arm: did the event recur (the detector's rule, the same phase, metric and kind,
an onset within ``window`` steps of the original onset) and how large was it. Per arm
family: the recurrence fraction with its 95% Wilson interval. Then the rules below, in
this order; "removes" means a family's recurrence fraction is at most ``REMOVES`` and
"keeps" at least ``KEEPS``:

1. ``exact`` did not recur (or was not bitwise): **undetermined** (the replay does not
   reproduce the event, so no arm can be read against it).
2. aug removes it (and order/skip keep it or were not run): **tied to this augmentation
   draw**.
3. order or skip removes it and aug keeps it: **tied to the batch / order**.
4. aug keeps it and order keeps it (where run): **carried by the state** (the event was
   coming whatever the draw or the batches).
5. Otherwise **undetermined**, with the fractions that led there.

Remedies (``lr``, ``clip``) are reported beside the cause: "prevented by remedy X in
k/N" for each remedy family whose arms did not recur.
"""

from __future__ import annotations

from jaxrepro import stats

REMOVES = 0.25  # a family recurring in at most this fraction of its arms removes the event
KEEPS = 0.75  # ... in at least this fraction keeps it

RULES = (
    "exact did not recur -> undetermined",
    f"aug recurs <= {REMOVES:.0%} (order/skip do not) -> tied to this augmentation draw",
    f"order or skip recurs <= {REMOVES:.0%} and aug >= {KEEPS:.0%} -> tied to the batch / order",
    f"aug >= {KEEPS:.0%} and order >= {KEEPS:.0%} (if run) -> carried by the state",
    "otherwise -> undetermined",
    "a remedy family whose event is absent in k of its N arms -> prevented by it in k/N",
)

AUG, BATCH, STATE, UNDETERMINED = (
    "tied to this augmentation draw",
    "tied to the batch / order",
    "carried by the state",
    "undetermined",
)


def recurs(original: dict, events: list[dict], window: int) -> dict | None:
    """The arm's event matching ``original`` (same phase, metric, kind; onset within
    ``window`` steps), or None."""
    best = None
    for e in events:
        if (e.get("phase"), e.get("metric"), e.get("kind")) != (
            original.get("phase"),
            original.get("metric"),
            original.get("kind"),
        ):
            continue
        gap = abs(int(e["step"]) - int(original["step"]))
        if gap <= window and (best is None or gap < abs(int(best["step"]) - int(original["step"]))):
            best = e
    return best


def families(outcomes: list[dict]) -> dict:
    """Per arm family: arms, recurred count, fraction and its Wilson interval."""
    out: dict[str, dict] = {}
    for o in outcomes:
        f = out.setdefault(o["family"], {"arms": [], "recurred": 0})
        f["arms"].append(o["arm"])
        f["recurred"] += bool(o["recurred"])
    for f in out.values():
        n = len(f["arms"])
        f["n"] = n
        f["fraction"] = f["recurred"] / n
        lo, hi = stats.wilson(f["recurred"], n)
        f["ci95"] = [round(lo, 4), round(hi, 4)]
    return out


def _removes(f: dict | None) -> bool:
    return f is not None and f["fraction"] <= REMOVES


def _keeps(f: dict | None) -> bool:
    return f is not None and f["fraction"] >= KEEPS


def verdict(outcomes: list[dict], *, exact_bitwise: bool | None) -> dict:
    """The verdict of one event from its arms' outcomes (see the module's rules)."""
    fam = families(outcomes)
    exact, aug = fam.get("exact"), fam.get("aug")
    order, skip = fam.get("order"), fam.get("skip")
    data = [f for f in (order, skip) if f is not None]
    if exact is not None and (exact["recurred"] < exact["n"] or exact_bitwise is False):
        cause, rule = UNDETERMINED, RULES[0]
    elif _removes(aug) and all(not _removes(f) for f in data):
        cause, rule = AUG, RULES[1]
    elif any(_removes(f) for f in data) and _keeps(aug):
        cause, rule = BATCH, RULES[2]
    elif _keeps(aug) and (order is None or _keeps(order)):
        cause, rule = STATE, RULES[3]
    else:
        cause, rule = UNDETERMINED, RULES[4]
    remedies = {
        name: f"prevented in {f['n'] - f['recurred']}/{f['n']}"
        for name, f in fam.items()
        if name in ("lr", "clip")
    }
    numbers = ", ".join(
        f"{name} {f['recurred']}/{f['n']} recurred" for name, f in sorted(fam.items())
    )
    return {
        "cause": cause,
        "rule": rule,
        "families": fam,
        "remedies": remedies,
        "because": numbers,
    }
