"""Seeds: mean ± standard error over runs, each seed equal to its single run, resumable."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dynsim.errors import ConfigError
from dynsim.pipelines.dssm import DSSMConfig, run_dssm
from dynsim.readouts import paired_difference
from dynsim.studies.seeds import mean_sem, parse_seeds, run_dssm_seeds

SMALL = dict(data="digits", epochs=1, images_per_epoch=60, eval_every=1, eval_train_size=300,
             eval_test_size=200, max_steps=200, progress=False, readout="ridge")


def test_mean_sem_formula():
    m, s = mean_sem([0.80, 0.82, 0.87])
    assert m == pytest.approx(0.83)
    assert s == pytest.approx(np.std([0.80, 0.82, 0.87], ddof=1) / math.sqrt(3))
    assert mean_sem([0.5]) == (0.5, None)


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5,9") == [3, 4, 5, 9]
    for bad, msg in (("a,b", "integers"), ("1,1", "repeated"), ("", "empty"), ("-3", "between")):
        with pytest.raises(ConfigError, match=msg):
            parse_seeds(bad)


def test_paired_difference_by_hand():
    y = np.array([0, 1, 2, 3])
    a = np.array([0, 1, 2, 0])  # 3 right
    b = np.array([0, 0, 2, 0])  # 2 right
    out = paired_difference(a, b, y)  # per-image differences 0, 1, 0, 0
    assert out["difference"] == pytest.approx(0.25)
    assert out["se_test_images"] == pytest.approx(np.std([0, 1, 0, 0], ddof=1) / 2)


def test_seeds_combine_single_runs_and_resume(tmp_path, capsys):
    out = tmp_path / "run.json"
    res = run_dssm_seeds(DSSMConfig(**SMALL, out=str(out)), [0, 1], workers=1)
    f = res["final"]
    singles = [run_dssm(DSSMConfig(**SMALL, seed=s))["final"]["test_accuracy"] for s in (0, 1)]
    assert f["test_accuracy_per_seed"] == singles  # each seed is exactly its own single run
    assert f["test_accuracy_mean"] == pytest.approx(np.mean(singles))
    assert f["test_accuracy_sem"] == pytest.approx(np.std(singles, ddof=1) / math.sqrt(2))
    raw = f["raw_pixel_accuracy_per_seed"]  # the subsets depend on the seed, so does the baseline
    assert f["gain_over_raw_per_seed"] == pytest.approx([a - r for a, r in zip(singles, raw, strict=True)])
    saved = json.loads(out.read_text())
    assert saved["final"]["test_accuracy_per_seed"] == singles and saved["seeds"] == [0, 1]
    assert (tmp_path / "run_accuracy.png").stat().st_size > 0
    # a second call reuses every seed's cell instead of training again
    capsys.readouterr()
    again = run_dssm_seeds(DSSMConfig(**{**SMALL, "progress": True}, out=str(out)), [0, 1], workers=1)
    assert again["final"] == f
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("reused") == 2


def test_seeds_need_out():
    with pytest.raises(ConfigError, match="--seeds needs --out"):
        run_dssm_seeds(DSSMConfig(**SMALL), [0, 1])
