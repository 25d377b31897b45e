"""Same seed, same machine: identical numbers (everything but wall-clock timings) and weights."""

from __future__ import annotations

import json

import torch
from result_utils import without_timings

from dynsim.checkpoint import checkpoint_path, load_checkpoint
from dynsim.cli import main

ARGS = ["run", "dssm", "--data", "digits", "--epochs", "2", "--images-per-epoch", "30", "--batch-size", "3",
        "--max-steps", "200", "--eval-every", "1", "--eval-train-size", "200", "--eval-test-size", "100",
        "--no-progress"]




def test_two_runs_same_seed_identical(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main([*ARGS, "--out", str(a)]) == 0
    assert main([*ARGS, "--out", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("history", "final", "iterations_per_input", "baseline", "system", "data"):
        assert without_timings(ra[key]) == without_timings(rb[key]), key
    wa = load_checkpoint(checkpoint_path(a))["modules"]["system"]
    wb = load_checkpoint(checkpoint_path(b))["modules"]["system"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_other_seed_other_numbers(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # euler: its step counts fingerprint the weights (Newton's 1-2 steps per digit can coincide)
    assert main([*ARGS, "--epochs", "1", "--solver", "euler", "--out", str(a)]) == 0
    assert main([*ARGS, "--epochs", "1", "--solver", "euler", "--seed", "1", "--out", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["iterations_per_input"] != rb["iterations_per_input"]
