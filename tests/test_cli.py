"""The DSSM pipeline through the CLI: result JSON, plots, and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynsim.cli import main
from dynsim.data import FASHION_MNIST_DEFAULT_DIR

TINY = ["--epochs", "2", "--images-per-epoch", "40", "--threshold", "1e-2", "--max-steps", "200",
        "--eval-every", "1", "--eval-train-size", "300", "--eval-test-size", "150", "--no-progress"]


def test_run_dssm_on_digits_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "dssm", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["data"] == "digits" and result["config"]["nps"] == 4
    assert result["dynsim_version"]
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert result["history"][1]["images_seen"] == 80
    for h in result["history"]:
        assert 0 < h["mean_iterations"] <= h["max_iterations"] <= 200
        assert 0.0 <= h["fraction_converged"] <= 1.0
        assert 0.1 < h["test_accuracy"] <= 1.0
    assert len(result["iterations_per_input"]) == 80
    final = result["final"]
    assert final["test_accuracy"] == result["history"][-1]["test_accuracy"]
    assert 0.5 < final["raw_pixel_accuracy"] <= 1.0
    assert final["train_seconds"] > 0 and final["eval_seconds"] > 0
    # 4x4 sites centred at (2i+1, 2j+1); each sees the pixels of the 8x8 image within radius 3
    seen = sum((k + 0.5 - 2 * i - 1) ** 2 + (m + 0.5 - 2 * j - 1) ** 2 <= 9
               for i in range(4) for j in range(4) for k in range(8) for m in range(8))
    assert result["system"]["n_neurons"] == 64 and result["system"]["ff_nonzeros"] == 4 * seen
    for key in ("accuracy_plot", "iterations_plot"):
        png = Path(result["files"][key])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in capsys.readouterr().out


def test_same_seed_same_numbers(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    args = ["run", "dssm", *TINY, "--epochs", "1"]
    main([*args, "--out", str(a)])
    main([*args, "--out", str(b)])
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["iterations_per_input"] == rb["iterations_per_input"]
    assert ra["final"]["test_accuracy"] == rb["final"]["test_accuracy"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--threshold", "0"], "--threshold must be > 0"),
        (["--threshold=-1e-4"], "--threshold must be > 0"),
        (["--threshold", "none", "--max-steps", "none"], "never stop"),
        (["--nps", "0"], "--nps must be"),
        (["--batch-size", "500"], "--batch-rule mean"),
        (["--schedule", "wobbly"], "step schedule"),
        (["--solver", "nope"], "unknown solver"),
        (["--data", "mnist"], "--data-dir"),
        (["--data", "fashion-mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_bad_settings_exit_2_with_message(args, message, capsys, tmp_path):
    code = main(["run", "dssm", *TINY, *args, "--out", str(tmp_path / "x.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dynsim: error:") and message in err
    assert not (tmp_path / "x.json").exists()


def test_unknown_data_set_is_rejected_by_parser(capsys):
    assert main(["run", "dssm", "--data", "imagenet"]) == 2
    assert capsys.readouterr().err == ("dynsim: error: --data must be one of digits, mnist, fashion-mnist, cifar10, "
                                       "cifar100, stl10, got 'imagenet'\n")


def test_nan_image_is_rejected_with_its_index():
    from dynsim.data import check_images
    from dynsim.errors import DataError

    x = np.zeros((5, 64), dtype=np.float32)
    x[3, 10] = np.nan
    with pytest.raises(DataError, match=r"x\[3\] contains NaN"):
        check_images(x, 64)


def test_console_script_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dynsim", "run", "dssm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--stream-every" in out.stdout


@pytest.mark.realdata
def test_short_fashion_mnist_run(tmp_path):
    if not (FASHION_MNIST_DEFAULT_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            f"Fashion-MNIST not installed at {FASHION_MNIST_DEFAULT_DIR} (apt-get install dataset-fashion-mnist)"
        )
    out = tmp_path / "f.json"
    args = ["run", "dssm", "--data", "fashion-mnist", "--epochs", "1", "--images-per-epoch", "100",
            "--threshold", "1e-2", "--eval-train-size", "2000", "--eval-test-size", "500", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["n_train"] == 60_000 and result["system"]["n_neurons"] == 784
    assert result["final"]["test_accuracy"] > 0.6  # 10 classes: chance is 0.1


def test_result_header_is_the_design_contract():
    import dynsim
    from dynsim.pipelines.dssm import DSSMConfig
    from dynsim.results import result_header

    head = result_header("run dssm", DSSMConfig(nps=8), device="cpu")
    assert list(head) == ["command", "dynsim_version", "torch_version", "machine", "config"]
    assert head["command"] == "run dssm" and head["dynsim_version"] == dynsim.__version__
    assert head["machine"]["device"] == "cpu" and head["machine"]["threads"] >= 1
    assert head["config"]["nps"] == 8 and head["config"]["threshold"] == 1e-4
