"""The scheduler's state in a Trainer checkpoint: one log-history entry, and one way back.

The entry holds ``LayerScheduler.state_dict()`` under ``layer_schedule_state``; ``trainer_state.json``
saves it with every checkpoint, on every transformers version.  Checkpoints of release 0.2.0 have
none: their state is read from the switch entries and the adaptive entry they logged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

STATE_KEY = "layer_schedule_state"
# An adaptive schedule's decision log, also shown on its own (docs/adaptive.md; read by trackers and tests).
ADAPTIVE_KEY = "layer_schedule_adaptive"


def _entry(log_history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    for entry in log_history:
        if STATE_KEY in entry or ADAPTIVE_KEY in entry:
            return entry
    return None


def keep_state(trainer_state: Any, scheduler_state: Dict[str, Any]) -> None:
    """Put the scheduler's state into the Trainer state for the checkpoint saved next: one entry, updated in
    place, so the history grows by one entry however many checkpoints there are."""
    entry = _entry(trainer_state.log_history)
    if entry is None:
        entry = {}
        trainer_state.log_history.append(entry)
    entry[STATE_KEY] = scheduler_state
    if scheduler_state.get("adaptive") is not None:
        entry[ADAPTIVE_KEY] = scheduler_state["adaptive"]
    entry["step"] = int(trainer_state.global_step)


def saved_state(log_history: List[Dict[str, Any]], global_step: int) -> Optional[Dict[str, Any]]:
    """The scheduler state a checkpoint was saved with (``None``: a new run, or no state recorded)."""
    if not global_step:
        return None
    entry = _entry(log_history)
    if entry is not None and STATE_KEY in entry:
        return dict(entry[STATE_KEY])
    return _legacy(log_history, global_step)


def _legacy(log_history: List[Dict[str, Any]], global_step: int) -> Optional[Dict[str, Any]]:
    """Release 0.2.0: the switch entries (``schedule_time``, ``schedule_offset``, ``step``) and the adaptive
    entry, read back into the form of ``LayerScheduler.state_dict()``."""
    entries = [e for e in log_history if "schedule_time" in e]
    if not entries or "schedule_offset" not in entries[-1]:
        return None
    steps: Dict[int, int] = {}
    for entry in entries:
        steps.setdefault(int(entry["schedule_time"]), int(entry["step"]))
    state: Dict[str, Any] = {
        "offset": int(entries[-1]["schedule_offset"]), "time": int(entries[-1]["schedule_time"]),
        "switch_steps": sorted(steps.items()),
    }
    adaptive = _entry(log_history)
    if adaptive is not None:
        state["adaptive"] = adaptive[ADAPTIVE_KEY]
    # The switch the checkpoint's last optimizer step trained after (each entry records the ever-active set).
    trained = [e for e in entries if int(e["step"]) < global_step]
    if trained and "ever_active_layers" in trained[-1]:
        state["trained"] = {"time": int(trained[-1]["schedule_time"]),
                            "ever_active_layers": trained[-1]["ever_active_layers"]}
    return state
