"""Helpers shared by tests that compare result JSONs across runs."""

TIMING = {"train_seconds", "eval_seconds", "eval_settle_seconds", "readout_seconds", "total_seconds", "seconds"}


def without_timings(obj):
    """``obj`` (nested dicts/lists of a result) without its wall-clock timing fields."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
