"""Config files: --config run.toml or an earlier result .json; flags on the command line win."""

from __future__ import annotations

import json

import pytest

from dynsim.cli import build_parser, main
from dynsim.config import load_config_file, parse_args_with_config
from dynsim.errors import ConfigError

TOML = """
# a small digits run
epochs = 1
images-per-epoch = 20
max_steps = 100
eval-every = 0
eval-train-size = 100
eval-test-size = 50
threshold = "none"
no-progress = true
nps = 2
"""


def test_toml_keys_normalised_and_section_merged(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('nps = 2\nmax-steps = 10\n[dssm]\nnps = 3\n')
    assert load_config_file(path, section="dssm") == {"nps": 3, "max_steps": 10}


def test_flags_override_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    args = parse_args_with_config(build_parser(), ["run", "dssm", "--config", str(path), "--nps", "5"])
    assert args.nps == 5 and args.max_steps == 100 and args.threshold is None and not args.progress
    plain = parse_args_with_config(build_parser(), ["run", "dssm"])
    assert plain.nps == 4 and plain.config_values == {}  # the file's values did not leak into a new parser


def test_result_json_repeats_the_run(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML + 'tau = 2.0\n')
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    assert main(["run", "dssm", "--config", str(cfg), "--out", str(first)]) == 0
    r1 = json.loads(first.read_text())
    assert r1["config"]["nps"] == 2 and r1["config"]["tau"] == 2.0 and r1["config"]["threshold"] is None
    assert main(["run", "dssm", "--config", str(first), "--out", str(again)]) == 0
    r2 = json.loads(again.read_text())
    assert {k: v for k, v in r2["config"].items() if k != "out"} == {
        k: v for k, v in r1["config"].items() if k != "out"}
    assert r2["iterations_per_input"] == r1["iterations_per_input"]
    assert r2["final"]["test_accuracy"] == r1["final"]["test_accuracy"]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.toml", "nps = [1,\n", "not valid TOML"),
        ("a.toml", "npss = 4\n", "did you mean 'nps'"),
        ("a.toml", "nps = 'four'\n", "--nps must be an integer >= 1, got 'four'"),
        ("a.toml", "nps = 4.5\n", "--nps must be an integer >= 1, got 4.5"),
        ("a.toml", "residual = 'both'\n", "--residual must be one of field, increment, got 'both'"),
        ("a.toml", "[network]\nnps = 4\n", "[network] is a table"),
        ("a.yaml", "nps: 4\n", "use a .toml file"),
        ("a.json", "[1, 2]", "must hold a JSON object"),
        ("a.json", "{", "not valid JSON"),
    ],
)
def test_bad_config_files(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["run", "dssm", "--config", str(path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynsim: error:") and message in err, err


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file("/nonexistent/run.toml")


def test_every_command_takes_config(tmp_path):
    from dynsim.config import _leaves

    parser = build_parser()
    leaves = list(_leaves(parser))
    assert len(leaves) >= 2
    assert all(any(a.dest == "config" for a in leaf._actions) for leaf in leaves)


def test_study_command_reads_config_with_lists(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('thresholds = "1e-2,1e-3"\n[convergence]\nepochs = 2\n')
    argv = ["study", "convergence", "--config", str(path), "--epochs", "4"]
    args = parse_args_with_config(build_parser(), argv)
    assert args.thresholds == [1e-2, 1e-3] and args.epochs == 4  # parsed by the setting
    path.write_text('solvers = ["euler", "rk4"]\n')
    args = parse_args_with_config(build_parser(), ["bench", "solvers", "--config", str(path)])
    assert args.solvers == ["euler", "rk4"]
    path.write_text('tau = 2.0\n')  # not a flag of this command
    with pytest.raises(ConfigError, match="unknown setting 'tau'"):
        parse_args_with_config(build_parser(), ["study", "convergence", "--config", str(path)])
