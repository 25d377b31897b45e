"""Result files: compact JSON (per-input arrays on one line) that reads back unchanged."""

import json

from dynsim.results import dumps_compact, write_json_atomic


def test_plain_lists_on_one_line_and_round_trip(tmp_path):
    data = {"iterations_per_input": list(range(1000)), "per_seed": [{"a": [0.5, None]}], "empty": {}}
    text = dumps_compact(data)
    assert json.loads(text) == data
    assert '"iterations_per_input": [0,1,2,' in text
    assert text.count("\n") < 15  # 1000 numbers, a handful of lines
    write_json_atomic(tmp_path / "r.json", data)
    assert json.loads((tmp_path / "r.json").read_text()) == data
