"""Helpers shared by tests that compare result JSONs across runs."""



def is_timing(key: str) -> bool:
    """Wall-clock fields: ``seconds`` and every ``*_seconds`` key (``train_seconds``,
    ``last_readout_seconds``, …)."""
    return key == "seconds" or key.endswith("_seconds")


def without_timings(obj):
    """``obj`` (nested dicts/lists of a result) without its wall-clock timing fields."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
