"""Each command's settings are described once (a dataclass field with :func:`dynsim.settings.setting`
metadata): the flags, their ``--help`` defaults and choices, config-file reading and validation
all come from that description, and a bad value gets the same one-line error from a flag and
from a config file."""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path

import pytest

from dynsim.cli import build_parser, main
from dynsim.cli.dssm import config_from_args
from dynsim.config import parse_args_with_config
from dynsim.configs.dssm import DSSMConfig
from dynsim.configs.ssl import SSLConfig
from dynsim.errors import ConfigError
from dynsim.settings import Setting, check_setting, described, flag_of, meta_of
from dynsim.studies.bench import BenchConfig, available_settings
from dynsim.studies.convergence import ConvergenceConfig
from dynsim.studies.deep import DeepStudyConfig
from dynsim.studies.nps import NpsStudyConfig
from dynsim.studies.repro import ReproConfig
from dynsim.studies.trajectories import TrajectoryConfig

ROOT = Path(__file__).resolve().parents[1]


def _leaf(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}


GENERATED = [(DSSMConfig, ("run", "dssm"), 25), (SSLConfig, ("run", "ssl"), 25),
             (ConvergenceConfig, ("study", "convergence"), 20), (TrajectoryConfig, ("plot", "trajectories"), 13),
             (NpsStudyConfig, ("study", "nps"), 16), (ReproConfig, ("study", "repro"), 15),
             (DeepStudyConfig, ("study", "deep"), 22), (BenchConfig, ("bench", "solvers"), 19)]


@pytest.mark.parametrize(("cls", "path", "least"), GENERATED, ids=[" ".join(g[1]) for g in GENERATED])
def test_every_flag_is_generated_from_its_field(cls, path, least):
    actions = _actions(_leaf(*path))
    fields = [f for f in described(cls) if meta_of(f).cli]
    assert len(fields) >= least
    for f in fields:
        action = actions[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert action.default == default, f.name
        assert flag_of(f) in action.option_strings, f.name
        assert meta_of(f).help.split(" (")[0] in action.help.replace("%%", "%"), f.name
        if meta_of(f).choices is not None:
            assert action.metavar == "{" + ",".join(map(str, check_choices(f))) + "}", f.name


def check_choices(f):
    from dynsim.settings import choices_of

    return choices_of(f)


def _patch_field(monkeypatch, cls, name: str, *, default=dataclasses.MISSING, **meta):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is not dataclasses.MISSING:
        monkeypatch.setattr(f, "default", default)
    if meta:
        new = dataclasses.replace(meta_of(f), **meta)
        monkeypatch.setattr(f, "metadata", types.MappingProxyType({**f.metadata, "setting": new}))
    return f


def test_a_default_changed_in_the_description_reaches_help_parser_and_config_file(monkeypatch, tmp_path):
    _patch_field(monkeypatch, DSSMConfig, "eta0", default=0.0025)
    parser = build_parser()
    help_text = _leaf("run", "dssm").format_help()
    assert "(default: 0.0025)" in " ".join(help_text.split())
    cfg = tmp_path / "run.toml"
    cfg.write_text("nps = 2\n")  # eta0 not in the file: the description's default applies
    args = parse_args_with_config(parser, ["run", "dssm", "--config", str(cfg), "--out", "x.json"])
    assert args.eta0 == 0.0025 and config_from_args(args).eta0 == 0.0025 and args.nps == 2


def test_choices_changed_in_the_description_reach_the_flag_and_the_config_file(monkeypatch, tmp_path, capsys):
    _patch_field(monkeypatch, DSSMConfig, "residual", choices=("field",))
    assert main(["run", "dssm", "--residual", "increment", "--out", str(tmp_path / "a.json")]) == 2
    from_flag = capsys.readouterr().err
    cfg = tmp_path / "run.toml"
    cfg.write_text('residual = "increment"\n')
    assert main(["run", "dssm", "--config", str(cfg), "--out", str(tmp_path / "b.json")]) == 2
    from_file = capsys.readouterr().err
    assert from_flag == from_file == "dynsim: error: --residual must be one of field, got 'increment'\n"


BAD = [
    (["run", "dssm"], "--max-steps", "0", "max-steps = 0",
     "--max-steps must be an integer >= 1 ('none': no cap), got 0"),
    (["run", "dssm"], "--max-steps", "lots", 'max_steps = "lots"',
     "--max-steps must be an integer >= 1 ('none': no cap), got 'lots'"),
    (["run", "dssm"], "--residual", "both", 'residual = "both"',
     "--residual must be one of field, increment, got 'both'"),
    (["run", "dssm"], "--eta0", "-1", "eta0 = -1.0", "--eta0 must be >= 0 (a finite number), got -1.0"),
    (["run", "dssm"], "--nps", "4,0", "nps = [4, 0]", "--nps must be an integer >= 1, got 0"),
    (["run", "dssm"], "--lateral-sign", "2", "lateral-sign = 2", "--lateral-sign must be one of -1, 1, got 2"),
    (["run", "ssl"], "--learning", "sideways", 'learning = "sideways"',
     "--learning must be one of e2e, gll, rll, got 'sideways'"),
    (["run", "ssl"], "--epochs", "-1", "epochs = -1", "--epochs must be an integer >= 0, got -1"),
    (["study", "convergence"], "--caps", "10,0", "caps = [10, 0]",
     "--caps: each value must be an integer >= 1 ('none': no cap), got 0"),
    (["study", "convergence"], "--thresholds", "1e-2,1e-2", "thresholds = [1e-2, 1e-2]",
     "--thresholds [0.01, 0.01] repeats a value"),
    (["study", "convergence"], "--backend", "slurm", 'backend = "slurm"',
     "--backend must be one of local, ray, got 'slurm'"),
    (["study", "convergence"], "--workers", "0", "workers = 0",
     "--workers must be an integer >= 1 ('none': all cores), got 0"),
    (["plot", "trajectories"], "--inputs", "0,-1", "inputs = [0, -1]",
     "--inputs: each value must be an integer >= 0, got -1"),
    (["plot", "trajectories"], "--units", "0", "units = 0", "--units must be an integer >= 1, got 0"),
    (["study", "nps"], "--nps", "4,0", "nps = [4, 0]", "--nps: each value must be an integer >= 1, got 0"),
    (["study", "nps"], "--seeds", "0,-1", "seeds = [0, -1]", "--seeds must be between 0 and 2**63 - 1, got -1"),
    (["study", "nps"], "--epochs", "0", "epochs = 0", "--epochs must be an integer >= 1, got 0"),
    (["study", "repro"], "--settings", "T=1e-3", 'settings = ["T=1e-3"]',
     "unknown repro setting(s) ['T=1e-3']; choose from ['T=1e-4', 'T=1e-2', 'T=1e-2, batch 100', 'cap 10', "
     "'cap 10, stream 10', 'cap 1', 'cap 1, stream 1']"),
    (["study", "repro"], "--eval-every", "-1", "eval-every = -1", "--eval-every must be an integer >= 0, got -1"),
    (["bench", "solvers"], "--states", "init,later", 'states = ["init", "later"]',
     "--states must be among init, trained; got ('init', 'later')"),
    (["bench", "solvers"], "--repeats", "0", "repeats = 0", "--repeats must be an integer >= 1, got 0"),
    (["bench", "solvers"], "--max-steps", "none", 'max-steps = "none"',
     "--max-steps none: bench solvers settles to a fixed threshold and step cap; give a number"),
    (["study", "deep"], "--layers", "1,0", "layers = [1, 0]", "--layers: each value must be an integer >= 1, got 0"),
    (["study", "deep"], "--gains", "1,-2", "gains = [1.0, -2.0]",
     "--gains: each value must be > 0 (a finite number), got -2.0"),
    (["study", "deep"], "--streams", "off,0", 'streams = ["off", 0]',
     "--streams: each value must be an integer >= 1 ('none': off), got 0"),
    (["plot", "trajectories"], "--data", "imagenet", 'data = "imagenet"',
     "--data must be one of digits, mnist, fashion-mnist, cifar10, cifar100, stl10, got 'imagenet'"),
]


@pytest.mark.parametrize(("command", "flag", "text", "toml", "message"), BAD, ids=[b[1] + "=" + b[2] for b in BAD])
def test_a_bad_value_gets_the_same_one_line_error_from_a_flag_and_a_config_file(
        command, flag, text, toml, message, tmp_path, capsys):
    assert main([*command, f"{flag}={text}", "--out", str(tmp_path / "a.json")]) == 2
    from_flag = capsys.readouterr().err
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml + "\n")
    assert main([*command, "--config", str(cfg), "--out", str(tmp_path / "b.json")]) == 2
    from_file = capsys.readouterr().err
    assert from_flag == from_file == f"dynsim: error: {message}\n"
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_python_gets_the_same_message():
    with pytest.raises(ConfigError) as exc:
        DSSMConfig(max_steps=0).validate()
    assert str(exc.value) == "--max-steps must be an integer >= 1 ('none': no cap), got 0"
    f = next(f for f in described(SSLConfig) if f.name == "schedule")
    with pytest.raises(ConfigError, match=r"^--learning must be one of e2e, gll, rll, got 'x'$"):
        check_setting(f, "x")


def test_schedule_means_step_sizes_everywhere_and_ssl_says_learning(tmp_path, capsys):
    run_ssl = _leaf("run", "ssl")
    assert "--learning" in _actions(run_ssl)["schedule"].option_strings
    assert "--learning" not in _leaf("run", "dssm").format_help()
    assert "--schedule" not in run_ssl.format_help()  # the old spelling is hidden ...
    args = run_ssl.parse_args(["--schedule", "gll"])  # ... still accepted, with a warning
    assert args.schedule == "gll"
    assert "dynsim: warning: --schedule is deprecated; use --learning" in capsys.readouterr().err
    cfg = tmp_path / "ssl.toml"
    cfg.write_text('learning = "rll"\n')  # a config key may be the flag's name
    args = parse_args_with_config(build_parser(), ["run", "ssl", "--config", str(cfg)])
    assert args.schedule == "rll"


def test_flags_shared_by_commands_name_the_same_setting():
    """A flag that several commands have stores into the same setting in each."""
    from dynsim.config import _leaves

    seen: dict[str, tuple[str, str]] = {}
    for leaf in _leaves(build_parser()):
        for action in leaf._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    first = seen.setdefault(option, (leaf.prog, action.dest))
                    assert first[1] == action.dest, f"{option}: {first} vs {leaf.prog} -> {action.dest}"


def test_resume_needs_out_is_written_once(tmp_path, capsys):
    hits = [p for p in (ROOT / "dynsim").rglob("*.py") if "--resume needs --out" in p.read_text()]
    assert [p.name for p in hits] == ["checkpoint.py"]
    for command in (["run", "dssm"], ["run", "ssl"]):
        assert main([*command, "--resume"]) == 2
        assert "--resume needs --out PATH" in capsys.readouterr().err
    from dynsim.pipelines.dssm import run_dssm

    with pytest.raises(ConfigError, match="--resume needs --out PATH"):
        run_dssm(DSSMConfig(epochs=1, out=None), resume=True)


def test_setting_metadata_is_typed():
    f = next(f for f in described(DSSMConfig) if f.name == "threshold")
    assert isinstance(meta_of(f), Setting) and flag_of(f) == "--threshold"


@pytest.mark.parametrize(("line", "progress"), [("no-progress = false", True), ("no-progress = true", False),
                                                ("progress = false", False)])
def test_a_switch_in_a_config_file_means_what_it_says(tmp_path, line, progress):
    """``no-progress = false`` once read as a one-item list, i.e. true."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(line + "\n")
    args = parse_args_with_config(build_parser(), ["run", "dssm", "--config", str(cfg)])
    assert args.progress is progress


def test_a_list_setting_reads_the_same_from_a_flag_and_a_config_file(tmp_path):
    """``--caps 1,none`` and ``caps = [1, "none"]``/``caps = "1,none"`` are one list of step caps."""
    parser = build_parser()
    from_flag = parse_args_with_config(parser, ["study", "convergence", "--caps", "1,none", "--streams", "off"])
    cfg = tmp_path / "study.toml"
    cfg.write_text('caps = "1,none"\nstreams = "off"\n')
    from_file = parse_args_with_config(build_parser(), ["study", "convergence", "--config", str(cfg)])
    assert from_flag.caps == from_file.caps == [1, None]
    assert from_flag.streams == from_file.streams == [None]
    help_text = " ".join(_leaf("study", "convergence").format_help().split())
    assert "(default: 1,10,100,3000)" in help_text and "(default: off,10)" in help_text


def test_a_described_default_reaches_a_study_command(monkeypatch):
    _patch_field(monkeypatch, ConvergenceConfig, "epochs", default=7)
    from dynsim.cli.studies import _convergence_config

    args = parse_args_with_config(build_parser(), ["study", "convergence"])
    assert args.epochs == 7 and _convergence_config(args).epochs == 7


def test_several_words_read_the_same_from_a_flag_and_a_config_file(tmp_path):
    """``--solvers euler rk4`` (nargs) and ``solvers = ["euler", "rk4"]`` are one tuple of specs."""
    from dynsim.cli.studies import _trajectory_config

    from_flag = parse_args_with_config(build_parser(), ["plot", "trajectories", "--solvers", "euler", "rk4"])
    cfg = tmp_path / "plot.toml"
    cfg.write_text('solvers = ["euler", "rk4"]\ninputs = [2, 5]\n')
    from_file = parse_args_with_config(build_parser(), ["plot", "trajectories", "--config", str(cfg)])
    assert _trajectory_config(from_flag).solvers == _trajectory_config(from_file).solvers == ("euler", "rk4")
    assert _trajectory_config(from_file).inputs == (2, 5)
    help_text = " ".join(_leaf("plot", "trajectories").format_help().split())
    assert "(default: euler,schedule=seed rk4,schedule=constant:1.0" in help_text


def test_bench_solvers_defaults_to_the_built_in_list_with_adapters_only_where_installed(monkeypatch, tmp_path):
    """``--solvers`` omitted: the built-in list, less the adapters whose library is missing."""
    from dynsim.cli.studies import _bench_config
    from dynsim.studies import bench

    monkeypatch.setattr(bench, "missing_adapters", lambda: {"torchode"})
    parser = build_parser()  # the default is computed when the parser is built
    args = parse_args_with_config(parser, ["bench", "solvers"])
    assert args.solvers == available_settings()
    assert not any(s.startswith("torchode") for s in args.solvers)
    assert any(s.startswith("torchdiffeq") for s in args.solvers) and "newton" in " ".join(args.solvers)
    assert len(args.solvers) == len(bench.DEFAULT_SETTINGS) - sum(s.startswith("torchode")
                                                                  for s in bench.DEFAULT_SETTINGS)
    cfg = tmp_path / "bench.toml"
    cfg.write_text('accuracy = ["euler"]\ntrain-threshold = 1e-3\n')  # the flag's name; a setting without one
    config = _bench_config(parse_args_with_config(build_parser(), ["bench", "solvers", "--config", str(cfg)]))
    assert config.accuracy_solvers == ("euler",) and config.train_threshold == 1e-3
    help_text = " ".join(_leaf("bench", "solvers").format_help().split())
    assert f"a built-in list of {len(bench.DEFAULT_SETTINGS)} settings, newton included" in help_text
