"""Every flag of every command validated up front (issue 19, item 4): one line naming the flag,
its range and the value, before any long work; one range per setting across commands."""

from __future__ import annotations

import argparse
import time

import pytest

from dynsim.cli import build_parser, main
from dynsim.settings import RANGES

COMMANDS = {
    "run dssm": ["run", "dssm", "--data", "digits", "--no-progress"],
    "run ssl": ["run", "ssl", "--data", "digits"],
    "study convergence": ["study", "convergence", "--no-progress"],
    "study ssl": ["study", "ssl", "--data", "digits"],
    "bench solvers": ["bench", "solvers", "--no-progress"],
    "plot trajectories": ["plot", "trajectories", "--no-progress"],
}


def refused(argv, capsys, tmp_path, out="r.json") -> str:
    t0 = time.perf_counter()
    code = main([*argv, "--out", str(tmp_path / out)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dynsim: error:"), err
    assert seconds < 10, f"refused only after {seconds:.0f} s"
    target = tmp_path / out
    assert not target.exists() or (target.is_dir() and not any(target.iterdir()))  # nothing written
    return lines[0]


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("study convergence", ["--thresholds", "abc"], "--thresholds 'abc': 'abc' is not a number"),
        ("study convergence", ["--streams", "foo"], "--streams 'foo': 'foo' is not an integer"),
        ("study convergence", ["--streams", "0"], "--streams: each value must be an integer >= 1 ('none': off), got 0"),
        ("study convergence", ["--caps", "0"], "--caps: each value must be an integer >= 1 ('none': no cap), got 0"),
        ("study convergence", ["--thresholds", "inf"], "--thresholds: each value must be > 0 (a finite number"),
        ("study convergence", ["--thresholds", ""], "--thresholds '' is empty"),
        ("study convergence", ["--workers", "0"], "--workers must be an integer >= 1"),
        ("plot trajectories", ["--inputs", "abc"], "--inputs 'abc': 'abc' is not an integer"),
        ("plot trajectories", ["--inputs", ""], "--inputs '' is empty"),
        ("plot trajectories", ["--inputs", "-1"], "--inputs: each value must be an integer >= 0, got -1"),
        ("plot trajectories", ["--inputs", "99999"], "--inputs 99999: the digits test set has 449 images"),
        ("plot trajectories", ["--max-values", "0"], "--max-values must be an integer >= 1, got 0"),
        ("plot trajectories", ["--units", "0"], "--units must be an integer >= 1, got 0"),
        ("plot trajectories", ["--threshold", "none"], "--threshold none: plot trajectories records up to a fixed"),
        ("bench solvers", ["--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
        ("run dssm", ["--max-steps", "0"], "--max-steps must be an integer >= 1 ('none': no cap), got 0"),
        ("run dssm", ["--threshold", "inf"], "--threshold must be > 0 (a finite number; 'none': cap only), got inf"),
        ("run dssm", ["--stream-every", "0"], "--stream-every must be an integer >= 1 ('none': off), got 0"),
        ("run dssm", ["--nps", "100000"], "a network with --nps 100000 on digits needs about"),
        ("run dssm", ["--data", "fashion-mnist", "--nps", "100000"], "needs about 73.9 TB of memory"),
        ("run ssl", ["--arch", "c100000-c100000"], "the encoder 'c100000-c100000' at batch size 500 needs about"),
        ("run ssl", ["--lr", "0"], "--lr must be > 0 (a finite number; 'none': the authors' (1e-4; RF 1e-5)), got 0"),
        ("study ssl", ["--epochs", "1"], "GLL (--learning gll) with 3 stages needs --epochs >= 3 (got 1)"),
    ],
)
def test_bad_flags_are_refused_in_one_line(command, args, message, capsys, tmp_path):
    out = "study" if command == "study ssl" else "r.json"
    assert message in refused([*COMMANDS[command], *args], capsys, tmp_path, out)


@pytest.mark.parametrize("value", ["-1", str(2**70)])
def test_one_range_per_setting_across_commands(value, capsys, tmp_path):
    """The same bad --seed gives the same message in every command."""
    messages = set()
    for name, argv in COMMANDS.items():
        line = refused([*argv, "--seed", value], capsys, tmp_path, "study" if name == "study ssl" else "r.json")
        messages.add(line.split(": ", 1)[1])
    assert messages == {f"error: --seed must be an integer in 0 .. 4294967295, got {value}"}


def _numeric_flags():
    """(command, dest) of every flag of every command that takes a number."""
    parser = build_parser()
    from dynsim.config import _leaves

    for leaf in _leaves(parser):
        for action in leaf._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in ("int", "float") and not isinstance(action, argparse._HelpAction):
                yield leaf.prog.replace("dynsim ", ""), action.dest


def test_every_numeric_flag_has_one_described_range():
    missing = sorted({f"{cmd} --{dest}" for cmd, dest in _numeric_flags() if dest not in RANGES})
    assert missing == [] or set(missing) <= {
        # not a range but a choice, checked by argparse
        "run dssm --lateral_sign",
    }, missing


def test_toml_booleans_must_be_booleans(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('resume = "false"\n')
    line = refused(["run", "dssm", "--config", str(cfg)], capsys, tmp_path)
    assert "resume = 'false' must be a boolean: resume = true or resume = false" in line


def test_ssl_epochs_zero_is_documented_and_warned(tmp_path, capsys):
    parser = build_parser()
    run_ssl = parser._subparsers._group_actions[0].choices["run"]._subparsers._group_actions[0].choices["ssl"]
    help_text = run_ssl.format_help()
    assert "0: no training, the random-encoder baseline" in " ".join(help_text.split())
    out = tmp_path / "r.json"
    assert main(["run", "ssl", "--data", "digits", "--epochs", "0", "--n-train", "100", "--n-test", "50",
                 "--batch-size", "50", "--probe-epochs", "1", "--out", str(out)]) == 0
    assert "--epochs 0 trains nothing: the result is the random-encoder baseline" in capsys.readouterr().err


def test_every_run_ssl_flag_has_help_and_default():
    parser = build_parser()
    run_ssl = parser._subparsers._group_actions[0].choices["run"]._subparsers._group_actions[0].choices["ssl"]
    for action in run_ssl._actions:
        if action.dest in ("help",) or action.help == argparse.SUPPRESS:  # hidden: deprecated spellings
            continue
        assert action.help, f"--{action.dest} has no help"
        if action.default not in (None, False) and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"--{action.dest} does not say its default"
