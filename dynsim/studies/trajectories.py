"""``dynsim plot trajectories``: how the state settles, solver by solver, for chosen inputs.

Each chosen test input settles alone (batch 1) with every solver setting, recorded by a
:class:`~dynsim.monitors.TrajectoryMonitor`; the units shown are the ones with the
largest ``|u*|`` at the reference fixed point. The step-0 state (``u = 0``) is recorded too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynsim.data import DATASETS
from dynsim.errors import ConfigError
from dynsim.monitors import TrajectoryMonitor
from dynsim.results import result_header
from dynsim.settings import setting
from dynsim.settle import settle
from dynsim.solvers import solver_from_spec
from dynsim.stopping import MaxSteps, ResidualBelow

DEFAULT_TRAJECTORY_SOLVERS = (
    "euler,schedule=seed",
    "rk4,schedule=constant:1.0",
    "dopri5,rtol=1e-5,atol=1e-7",
    "anderson,beta=0.5,memory=5",
)


@dataclass
class TrajectoryConfig:
    """The settings of ``dynsim plot trajectories``, each described once (flags, ``--help``,
    config-file keys and validation come from the field metadata, :mod:`dynsim.settings`)."""

    data: str = setting("digits", help="data set", choices=DATASETS)
    data_dir: str | None = setting(None, help="directory with the data files", shown_default="None")
    nps: int = setting(4, help="neurons per site")
    solvers: tuple[str, ...] = setting(DEFAULT_TRAJECTORY_SOLVERS, nargs="+", metavar="SPEC",
                                       help="solver specs 'name,key=value,...' to overlay",
                                       shown_default=" ".join(DEFAULT_TRAJECTORY_SOLVERS))
    inputs: tuple[int, ...] = setting((0, 1), item="inputs", help="test-set indices of the inputs",
                                      shown_default="0,1")
    units: int = setting(4, help="units shown per input (largest |u*|)")
    threshold: float = setting(1e-4, help="field residual T")
    max_steps: int = setting(3000, help="step cap")
    train_images: int = setting(0, help="train this many images first (0: at init)")
    max_values: int = setting(1_000_000, help="memory budget of the recorder (floats)")
    seed: int = setting(0, help="seed of the weights and the image order")
    out: str | None = setting(None, help="result JSON path", shown_default="runs/trajectories-<data>-<time>.json")
    progress: bool = setting(True, help="no progress output")

    def validate(self) -> TrajectoryConfig:
        """Raise :class:`ConfigError` naming the first bad value (the fields' descriptions,
        :func:`dynsim.settings.check_settings`; each solver spec parsed)."""
        from dynsim.settings import check_settings

        if not self.inputs or not self.solvers:
            raise ConfigError("give at least one input (--inputs) and one solver (--solvers)")
        check_settings(self)
        for name in ("threshold", "max_steps"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} none: plot trajectories records up to a fixed "
                                  "threshold and step cap; give a number")
        for spec in self.solvers:
            solver_from_spec(spec)
        return self


def run_trajectories(config: TrajectoryConfig) -> dict[str, Any]:
    """Record the trajectories; write JSON + PNG if ``config.out``; return the result."""
    from dynsim.builders import build_layer, prepare_data
    from dynsim.configs.dssm import DSSMConfig
    from dynsim.studies.bench import BenchConfig, reference_fixed_points, train_layer

    config.validate()
    torch.set_num_threads(1)
    dcfg = DSSMConfig(data=config.data, data_dir=config.data_dir, nps=config.nps, seed=config.seed).validate()
    ds, x_train, x_test = prepare_data(dcfg)
    bad = [i for i in config.inputs if i >= len(x_test)]
    if bad:
        raise ConfigError(f"--inputs {bad[0]}: the {ds.name} test set has {len(x_test)} images "
                          f"(indices 0 .. {len(x_test) - 1})")
    layer = build_layer(dcfg, ds.image_shape)
    training = None
    if config.train_images:
        bcfg = BenchConfig(
            data=config.data,
            train_images=config.train_images,
            seed=config.seed,
            progress=config.progress,
        )
        training = train_layer(bcfg, layer, torch.as_tensor(x_train))
    stop = ResidualBelow(config.threshold) | MaxSteps(config.max_steps)
    inputs = []
    with torch.no_grad():
        for index in config.inputs:
            x = torch.as_tensor(x_test[index : index + 1])
            u_ref, _ = reference_fixed_points(layer, x, tol=1e-9)
            units = torch.argsort(u_ref[0].abs(), descending=True)[: config.units].tolist()
            runs = []
            for spec in config.solvers:
                monitor = TrajectoryMonitor(units, max_values=config.max_values)
                monitor.start(1)
                drive = layer.drive(x)
                u0 = torch.zeros_like(drive)
                # ‖du/ds‖/‖u‖ is undefined at u = 0: record NaN for step 0
                monitor.on_step(None, 0, u0, torch.full((1,), float("nan")))
                res = settle(
                    layer,
                    x,
                    solver=solver_from_spec(spec),
                    stop=stop,
                    on_step=lambda n, u, r, m=monitor: m.on_step(None, n, u, r),
                )
                arr = monitor.as_arrays()
                # the last step (settled state) is not passed to on_step once the sample stops
                steps = arr["steps"].tolist() + [int(res.steps[0])]
                traj_u = arr["u"][:, 0].tolist() + [res.u[0, units].tolist()]
                resid = arr["residual"][:, 0].tolist() + [float(res.residual[0])]
                runs.append(
                    {
                        "solver": spec,
                        "steps": steps,
                        "u": traj_u,
                        "residual": resid,
                        "status": int(res.status[0]),
                        "n_evals": res.n_evals,
                        "stride": monitor.stride,
                    }
                )
            inputs.append(
                {
                    "index": int(index),
                    "label": int(ds.y_test[index]),
                    "units": units,
                    "u_ref": u_ref[0, units].tolist(),
                    "runs": runs,
                }
            )
    result = {
        **result_header("plot trajectories", config),
        "training": training,
        "inputs": inputs,
    }
    if config.out:
        from dynsim.plots import plot_trajectories
        from dynsim.results import write_result

        write_result(Path(config.out), result, {"trajectories_plot": ("", plot_trajectories(result))})
    return result
