"""Bad settings, bad data and bad dynamics: refused at once, with the value and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynsim.checkpoint import checkpoint_path, load_checkpoint
from dynsim.cli import main
from dynsim.errors import DataError

FAST = ["--data", "digits", "--images-per-epoch", "20", "--max-steps", "100", "--eval-every", "0",
        "--eval-train-size", "100", "--eval-test-size", "50", "--no-progress"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lateral-distance", "-1"], "--lateral-distance must be >= 0 (a finite number), got -1.0"),
        (["--seed", "-1"], "--seed must be an integer in 0 .. 4294967295, got -1"),
        (["--eta0", "nan"], "--eta0 must be >= 0 (a finite number), got nan"),
        (["--schedule", "constant:0"], "--schedule 'constant:0': dt must be a positive"),
        (["--eval-train-size", "1"], "--eval-train-size must be an integer >= 2 ('none': all), got 1"),
        (["--device", "tpu"], "--device 'tpu' is not a torch device"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0"),
        (["--radius", "0.01"], "radius"),
        (["--stride", "100"], "stride 100"),
    ],
)
def test_bad_settings_are_refused(args, message, capsys, tmp_path):
    assert main(["run", "dssm", *FAST, *args, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynsim: error:") and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_out_directory_is_refused_before_training(tmp_path, capsys):
    assert main(["run", "dssm", *FAST, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_wrong_shape_and_non_finite_data_name_the_sample():
    from dynsim.data import check_images

    x = np.zeros((5, 64), dtype=np.float32)
    x[3, 7] = np.inf
    with pytest.raises(DataError, match=r"x_train\[3\] contains"):
        check_images(x, 64, name="x_train")
    with pytest.raises(DataError, match="expected 64"):
        check_images(np.zeros((5, 63)), 64, name="x_train")


def test_divergence_stops_with_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """Dynamics that blow up in epoch 2: exit 2, message names sample/step/solver and the checkpoint."""
    from dynsim.plasticity import SimilarityMatchingRule

    original = SimilarityMatchingRule.on_epoch_start

    def blow_up(self, engine, epoch):
        original(self, engine, epoch)
        if epoch == 1:
            self.layer.lateral.weight.mul_(-1e3)  # s(L − I) r with huge positive feedback

    monkeypatch.setattr(SimilarityMatchingRule, "on_epoch_start", blow_up)
    out = tmp_path / "d.json"
    argv = ["run", "dssm", *FAST, "--epochs", "3", "--activation", "linear", "--solver", "euler", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "diverged for sample" in err and "at step" in err and "Euler" in err
    assert f"last good checkpoint is {checkpoint_path(out)} (after epoch 1)" in err
    assert load_checkpoint(checkpoint_path(out))["completed_epochs"] == 1
    assert not out.exists()

    assert main([*argv, "--on-divergence", "skip", "--overwrite"]) == 0
    res = json.loads(out.read_text())
    assert res["final"]["diverged_skipped"] > 0
    assert sum(h["diverged"] for h in res["history"]) == res["final"]["diverged_skipped"]
