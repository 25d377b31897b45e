"""Schedules (GLL freezes, RLL balances), the SSL pipeline, its study and its settings."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dynsim.callbacks import Callback
from dynsim.cli import main
from dynsim.cli.ssl import add_run_arguments, add_study_arguments, run_from_args
from dynsim.errors import ConfigError
from dynsim.pipelines.ssl import SSLConfig, run_ssl
from dynsim.readouts import fit_linear_probe
from dynsim.ssl.augment import Deform
from dynsim.ssl.rules import make_rules
from dynsim.ssl.schedules import Greedy, RandomLayerwise, make_schedule
from dynsim.ssl.settler import ContrastiveSettler
from dynsim.ssl.stages import build_encoder
from dynsim.studies.ssl import STUDY_GRID, run_study

SHAPE = (1, 8, 8)


def _digits(n_train=400, n_test=200):
    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int64)
    ds = SimpleNamespace(
        name="digits",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[-n_test:],
        y_test=y[-n_test:],
        image_shape=SHAPE,
        n_classes=10,
    )
    ds.subset = lambda n_train=None, n_test=None, seed=0: _digits(n_train or 400, n_test or 200)
    return ds


def _engine_parts(schedule, *, epochs, batches_per_epoch, rule="bp"):
    from dynsim.engine import Batch, Engine

    enc = build_encoder("tiny", SHAPE, generator=torch.Generator().manual_seed(0))
    rules = make_rules(rule, enc, lr=1e-2, generator=torch.Generator().manual_seed(1))
    settler = ContrastiveSettler(
        enc,
        SHAPE,
        Deform(flip=False),
        tau=6.0,
        delta=3.0,
        negatives=5,
        grad_block=False,
        generator=torch.Generator().manual_seed(2),
    )
    sched = make_schedule(
        schedule,
        settler,
        rules,
        epochs=epochs,
        batches_per_epoch=batches_per_epoch,
        generator=torch.Generator().manual_seed(3),
    )
    x = torch.as_tensor(_digits().x_train[: 20 * batches_per_epoch])

    def batches(epoch):
        for k, idx in enumerate(torch.arange(len(x)).split(20)):
            yield Batch(x=x[idx], y=None, index=idx, epoch=epoch, number=k)

    return enc, sched, rules, batches, Engine


class _Snapshots(Callback):
    def __init__(self, enc):
        self.enc, self.epochs = enc, []

    def on_fit_start(self, engine):
        self.epochs.append({k: u.weight.detach().clone() for k, u in self.enc.units().items()})

    def on_epoch_end(self, engine, epoch):
        self.on_fit_start(engine)


def test_gll_trains_one_stage_at_a_time_and_freezes_the_others():
    enc, sched, rules, batches, Engine = _engine_parts("gll", epochs=6, batches_per_epoch=3)
    assert isinstance(sched, Greedy) and len(enc.stages) == 3
    snap = _Snapshots(enc)
    Engine(sched.settler, [sched, *rules, snap], progress=False).fit(batches, 6)
    for epoch in range(6):
        stage = epoch // 2
        before, after = snap.epochs[epoch], snap.epochs[epoch + 1]
        for k in before:
            changed = not torch.equal(before[k], after[k])
            assert changed == (k in (f"s{stage}", f"h{stage}")), (epoch, k)
    assert sched.history == [0] * 6 + [1] * 6 + [2] * 6


def test_rll_picks_each_stage_equally_often_per_epoch():
    enc, sched, rules, batches, Engine = _engine_parts("rll", epochs=3, batches_per_epoch=6)
    assert isinstance(sched, RandomLayerwise)
    snap = _Snapshots(enc)
    Engine(sched.settler, [sched, *rules, snap], progress=False).fit(batches, 3)
    assert sched.counts == [[2, 2, 2]] * 3
    for e in range(3):
        assert sorted(sched.history[6 * e : 6 * e + 6]) == [0, 0, 1, 1, 2, 2]
    assert sched.history[:6] != sched.history[6:12] or sched.history[6:12] != sched.history[12:]


def test_rll_state_dict_round_trip_repeats_the_order():
    enc, sched, rules, batches, Engine = _engine_parts("rll", epochs=1, batches_per_epoch=6)
    sched.on_epoch_start(None, 0)
    state = sched.state_dict()
    sched.on_epoch_start(None, 1)
    nxt = sched.order.clone()
    sched.load_state_dict(state)
    sched.on_epoch_start(None, 1)
    assert torch.equal(sched.order, nxt) and sched.counts[-1] == [2, 2, 2]


def test_rll_counts_differ_by_at_most_one_when_uneven():
    enc, sched, rules, batches, Engine = _engine_parts("rll", epochs=2, batches_per_epoch=5)
    Engine(sched.settler, [sched, *rules], progress=False).fit(batches, 2)
    for counts in sched.counts:
        assert sum(counts) == 5 and max(counts) - min(counts) <= 1


def test_run_ssl_result_follows_the_json_contract(tmp_path):
    out = tmp_path / "r.json"
    cfg = SSLConfig(data="digits", epochs=2, batch_size=50, probe_epochs=5, out=str(out))
    r = run_ssl(cfg, dataset=_digits(), progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk["final"] == r["final"]
    assert r["config"]["rule"] == "bp" and r["dynsim_version"]
    assert [h["epoch"] for h in r["history"]] == [0, 1]
    assert r["history"][-1]["images_seen"] == 2 * 400
    assert all(h["wall_seconds"] > 0 and np.isfinite(h["loss"]) for h in r["history"])
    f = r["final"]
    assert 0.1 < f["test_accuracy"] <= 1 and 0.1 < f["random_encoder_accuracy"] <= 1
    assert f["train_seconds"] > 0 and f["eval_seconds"] > 0 and not f["diverged"]
    again = run_ssl(SSLConfig(**{**cfg.__dict__, "out": None}), dataset=_digits(), progress=False)
    assert again["final"]["test_accuracy"] == f["test_accuracy"]  # same seed, same numbers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rule="hebb"), "--rule must be one of bp, rf, urf, dtp, got 'hebb'"),
        (dict(schedule="cyclic"), "--learning must be one of e2e, gll, rll, got 'cyclic'"),
        (dict(negatives=0), "negatives"),
        (dict(negatives=300, batch_size=50), "negatives"),
        (dict(tau=3.0, delta=3.0), "tau"),
        (dict(batch_size=1), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(epochs=-1), "epochs"),
        (dict(data="imagenet"), "data"),
        (dict(arch="c8-x4"), "x4"),
        (dict(schedule="gll", epochs=2), "GLL"),
        (dict(batch_size=1000), "batch_size"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    cfg = SSLConfig(**{"data": "digits", "epochs": 1, "batch_size": 50, **kwargs})
    with pytest.raises(ConfigError, match=match):
        run_ssl(cfg, dataset=_digits(), progress=False)


def test_cli_arguments_round_trip(tmp_path):
    parser = add_run_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--data",
            "digits",
            "--schedule",
            "rll",
            "--rule",
            "urf",
            "--negatives",
            "5",
            "--grad-block",
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--n-train",
            "100",
            "--probe-epochs",
            "2",
            "--out",
            str(tmp_path / "x.json"),
        ]
    )
    r = run_from_args(args)
    cfg = r["config"]
    assert (cfg["schedule"], cfg["rule"], cfg["negatives"], cfg["grad_block"]) == (
        "rll",
        "urf",
        5,
        True,
    )
    assert (tmp_path / "x.json").exists()
    study = add_study_arguments(argparse.ArgumentParser()).parse_args(["--workers", "2"])
    assert study.workers == 2 and not hasattr(study, "rule")


def test_study_grid_runs_on_digits_and_writes_the_table(tmp_path):
    base = SSLConfig(
        data="digits", n_train=300, n_test=150, epochs=3, batch_size=50, probe_epochs=5, threads=1, probe_every=0
    )
    summary = run_study(base, tmp_path, workers=1, progress=False)
    table = (tmp_path / "ssl_study.md").read_text()
    assert len(summary["rows"]) == len(STUDY_GRID) == 11
    for label in ("E2E | BP", "E2E | DTP", "GLL | URF", "RLL | RF", "random encoder"):
        assert label in table
    assert "71.44" in table and "61.23" in table  # published numbers beside ours
    assert all(r["accuracy"] is not None and r["accuracy"] > 10 for r in summary["rows"])
    assert json.loads((tmp_path / "ssl_study.json").read_text())["rows"] == summary["rows"]
    assert (tmp_path / "ssl_study.png").stat().st_size > 1000
    for r in summary["rows"]:  # a few CPU seconds per cell; the bound only catches a runaway budget (e.g. 100x
        assert r["train_seconds"] < 300  # the batches), since on a shared machine a cell may get ~5 % of a core


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    f = torch.randn(200, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float()
    r = fit_linear_probe(f[:150], y[:150], f[150:], y[150:], epochs=20, batch_size=32, seed=0)
    assert r["test_accuracy"] == 1.0 and r["n_features"] == 8
    with pytest.raises(ConfigError):
        fit_linear_probe(f, y, f, y, epochs=0, batch_size=32, seed=0)


# ------------------------------------------------------------- checkpoints and resume

RESUME_ARGS = ["run", "ssl", "--data", "digits", "--n-train", "400", "--n-test", "200",
               "--epochs", "3", "--batch-size", "50", "--probe-epochs", "5", "--threads", "1"]


def _interrupt_after_first_checkpoint(monkeypatch):
    """A kill right after the checkpoint of epoch 1 is written (Ctrl-C, out of time)."""
    from dynsim.checkpoint import Checkpoint

    save = Checkpoint.save

    def save_then_interrupt(self, engine, completed_epochs):
        path = save(self, engine, completed_epochs)
        if completed_epochs == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)


def _same_numbers(a: dict, b: dict) -> None:
    drop = ("wall_seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in a["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in b["history"]
    ]
    for key in ("test_accuracy", "train_accuracy", "random_encoder_accuracy", "images_seen"):
        assert a["final"][key] == b["final"][key], key


@pytest.mark.parametrize(
    "schedule, rule",
    [("rll", "urf"), ("e2e", "dtp"), ("gll", "rf")],
)
def test_interrupted_run_resumes_to_the_same_numbers_and_weights(tmp_path, monkeypatch, schedule, rule):
    from dynsim.checkpoint import load_checkpoint
    from dynsim.cli import main

    args = [*RESUME_ARGS, "--schedule", schedule, "--rule", rule]
    whole, cut = tmp_path / "whole.json", tmp_path / "cut.json"
    assert main([*args, "--out", str(whole)]) == 0

    with monkeypatch.context() as m:
        _interrupt_after_first_checkpoint(m)
        assert main([*args, "--out", str(cut)]) == 130  # interrupted
    assert not cut.exists()  # no result yet, only the checkpoint of epoch 1
    assert load_checkpoint(tmp_path / "cut.ckpt.pt")["completed_epochs"] == 1

    assert main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert b["resumed_from_epoch"] == 1 and a["resumed_from_epoch"] is None
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]
    _same_numbers(a, b)
    wa = load_checkpoint(tmp_path / "whole.ckpt.pt")["modules"]
    wb = load_checkpoint(tmp_path / "cut.ckpt.pt")["modules"]
    assert wa.keys() == wb.keys() and "encoder" in wa
    if rule == "dtp":
        assert any(k.startswith("inverse_") for k in wa)
    if rule in ("rf", "urf"):
        assert any(k.endswith("feedback") for k in wa["encoder"])
    for name in wa:
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), (name, k)


def test_resume_refuses_other_training_settings_and_needs_out(tmp_path, monkeypatch):
    from dynsim.cli import main

    out = tmp_path / "r.json"
    with monkeypatch.context() as m:
        _interrupt_after_first_checkpoint(m)
        assert main([*RESUME_ARGS, "--out", str(out)]) == 130
    with pytest.raises(ConfigError, match=r"different settings: lr=None \(now 0.01\)"):
        run_from_args(
            add_run_arguments(argparse.ArgumentParser()).parse_args(
                [*RESUME_ARGS[2:], "--lr", "0.01", "--out", str(out), "--resume"]
            )
        )
    with pytest.raises(ConfigError, match="--resume needs --out"):
        run_ssl(SSLConfig(data="digits", epochs=1, batch_size=50), dataset=_digits(), resume=True)
    # the probe settings and the number of epochs may change (extend a run)
    r = run_from_args(
        add_run_arguments(argparse.ArgumentParser()).parse_args(
            [*RESUME_ARGS[2:], "--probe-epochs", "2", "--out", str(out), "--resume"]
        )
    )
    assert r["resumed_from_epoch"] == 1 and len(r["history"]) == 3


def test_a_diverging_run_names_epoch_and_batch_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    from dynsim.checkpoint import load_checkpoint
    from dynsim.errors import DivergenceError
    from dynsim.ssl.settler import ContrastiveSettler

    settle = ContrastiveSettler.__call__

    def nan_in_epoch_1_batch_2(self, batch, on_step=None):
        result = settle(self, batch, on_step)
        if batch.epoch == 1 and batch.number == 2:
            result.loss = torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(ContrastiveSettler, "__call__", nan_in_epoch_1_batch_2)
    out = tmp_path / "d.json"
    args = add_run_arguments(argparse.ArgumentParser()).parse_args(
        [*RESUME_ARGS[2:], "--out", str(out)]
    )
    with pytest.raises(DivergenceError, match=r"nan at epoch 1, batch 2 .*after epoch 1\)"):
        run_from_args(args)
    r = json.loads(out.read_text())
    assert r["final"]["diverged"] and r["final"]["test_accuracy"] is None
    assert len(r["history"]) == 1  # only the finished epoch
    ckpt = load_checkpoint(tmp_path / "d.ckpt.pt")
    assert ckpt["completed_epochs"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["modules"]["encoder"].values())


def test_run_ssl_seeds_mean_and_paired_gain(tmp_path, capsys):
    import json

    out = tmp_path / "ssl.json"
    args = [*RESUME_ARGS, "--seeds", "0,1", "--workers", "1", "--out", str(out)]
    assert main(args) == 0
    f = json.loads(out.read_text())["final"]
    acc, rnd = f["test_accuracy_per_seed"], f["random_encoder_accuracy_per_seed"]
    assert len(acc) == 2 and f["test_accuracy_mean"] == pytest.approx(sum(acc) / 2)
    assert f["gain_over_random_per_seed"] == pytest.approx([a - b for a, b in zip(acc, rnd, strict=True)])
    assert f["test_accuracy_sem"] == pytest.approx(abs(acc[0] - acc[1]) / 2)  # s / √2 with two values
    assert "mean ± s.e. over 2 seeds" in capsys.readouterr().out


def test_study_rows_mean_and_sem_over_seeds():
    from dynsim.studies.ssl import study_cells, study_rows

    base = SSLConfig(data="digits", epochs=3)
    cells = study_cells(base, [0, 1, 2])
    assert len(cells) == 3 * len(study_cells(base))
    fake = [{"config": c, "final": {"test_accuracy": 0.5 + 0.01 * c["seed"], "train_seconds": 1.0},
             "history": [{"loss": 2.0}]} for c in cells]
    rows = study_rows(fake)
    assert len(rows) == len(study_cells(base))
    assert rows[0]["accuracy"] == pytest.approx(51.0) and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["accuracy_sem"] == pytest.approx(1.0 / 3**0.5)


def test_resumed_run_probes_and_stops_at_its_plateau_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """After --resume the probe monitor and the plateau rule see the restored epochs: the probe
    rows after the resume point and the plateau stop (epoch 2, window 2, a tolerance every
    decrease passes) are those of the uninterrupted run. (Before the fix the resumed run never
    probed again and trained its whole budget.)"""
    from dynsim.cli import main

    args = [*RESUME_ARGS[:6], "--epochs", "6", "--batch-size", "50", "--probe-epochs", "5", "--threads", "1",
            "--probe-every", "1", "--plateau-window", "2", "--plateau-tol", "1e9"]
    whole, cut = tmp_path / "whole.json", tmp_path / "cut.json"
    assert main([*args, "--out", str(whole)]) == 0
    with monkeypatch.context() as m:
        _interrupt_after_first_checkpoint(m)
        assert main([*args, "--out", str(cut)]) == 130
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert a["final"]["stopped_by"] == b["final"]["stopped_by"] == "plateau"
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]
    assert all("probe_test_accuracy" in h for h in b["history"])
    _same_numbers(a, b)
