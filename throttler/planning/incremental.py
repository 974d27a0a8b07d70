"""Whether a group's run can extend its previous output, reading only the new files (pure).

The previous output holds the sum over the files listed in its state
(:mod:`throttler.worker.state`). When every one of them is still in the group
with the same fingerprint, the new output is that sum plus the sum over the
files added since: the previous output is read as one more input (its keys
``path``/``Date``/``value`` satisfy the input contract), so every strategy
works unchanged, including a group whose key set grows with the new file
(the strategies sum over the union of keys). When no file is new either, the
previous output already is the answer: the run is UNCHANGED (nothing read,
nothing written, the output keeps its bytes and mtime). Otherwise the run is full.

Only the order of the additions differs from a full run, so results agree to
rounding (the property tests check 1e-12 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

from throttler.worker.state import AGGREGATE, STATE_VERSION, OutputState

INCREMENTAL, FULL, UNCHANGED = "incremental", "full", "unchanged"


@dataclass(frozen=True)
class RunDecision:
    """What kind of run, why, and which of the group's files to read (relative paths)."""

    kind: str  #: INCREMENTAL, FULL or UNCHANGED
    reason: str
    read: tuple[str, ...]  #: the group's files to read (the previous output comes on top when incremental)

    @property
    def incremental(self) -> bool:
        return self.kind == INCREMENTAL

    @property
    def unchanged(self) -> bool:
        return self.kind == UNCHANGED


def decide(previous: OutputState | None, current: dict[str, str], *, full_requested: bool = False,
           output_exists: bool = True) -> RunDecision:
    """Decide from the previous output's state and the group's current fingerprints.

    ``current`` maps each file of the group (path relative to the data root) to
    its fingerprint, in the catalog's order.
    """
    everything = tuple(current)
    reason = _why_full(previous, current, full_requested, output_exists)
    if reason is not None:
        return RunDecision(FULL, reason, everything)
    new = tuple(rel for rel in current if rel not in previous.files)
    if not new:
        return RunDecision(UNCHANGED, "no file new or changed since the previous output", ())
    return RunDecision(INCREMENTAL, f"{len(new)} new file(s) since the previous output", new)


def _why_full(previous: OutputState | None, current: dict[str, str], full_requested: bool,
              output_exists: bool) -> str | None:
    """Why the run must be full, or None when the previous output can be extended."""
    if full_requested:
        return "full run requested"
    if not output_exists:
        return "no previous output"
    if previous is None:
        return "the previous output has no valid state"
    if previous.version != STATE_VERSION or previous.aggregate != AGGREGATE:
        return f"the previous output's state is of another version ({previous.version}, {previous.aggregate})"
    if not previous.finite:
        return "the previous output holds NaN or infinite sums"
    removed = [rel for rel in previous.files if rel not in current]
    if removed:
        return f"{len(removed)} file(s) removed since the previous output (e.g. {removed[0]})"
    changed = [rel for rel, fp in previous.files.items() if current[rel] != fp]
    if changed:
        return f"{len(changed)} file(s) changed since the previous output (e.g. {changed[0]})"
    return None
