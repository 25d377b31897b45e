"""The authors' settings as defaults (recorded in the JSON), the plateau stop rule, the effective
rank, the activation placement, the views and the RLL budget."""

import json

import pytest
import torch

from dynsim.configs.ssl import AUTHORS, SSLConfig
from dynsim.data import load_dataset
from dynsim.pipelines.ssl import run_ssl
from dynsim.ssl.augment import Deform
from dynsim.ssl.signals import ContrastiveSignals
from dynsim.ssl.stages import build_encoder, spec_activations
from dynsim.ssl.training import PlateauStop, effective_rank, plateau_reached


def _digits():
    return load_dataset("digits")


def test_defaults_are_the_authors():
    c = SSLConfig()
    assert (c.act, c.batch_size, c.tau, c.delta, c.views, c.negatives_wrap) == (
        "hardtanh", 500, 6.0, 3.0, "clean+deformed", False)
    assert (c.probe, c.probe_epochs, c.probe_batch_size, c.probe_standardize) == ("adam", 400, 500, False)
    assert c.resolved_lr() == 1e-4 and SSLConfig(rule="rf").resolved_lr() == 1e-5
    assert c.departures() == []
    assert SSLConfig(lr=1e-3, probe_standardize=True, negatives_wrap=True).departures() == [
        "negatives_wrap=True (theirs False)", "probe_standardize=True (theirs False)",
        "lr=0.001 (theirs 0.0001 for bp)"]
    assert set(AUTHORS) <= set(SSLConfig.__dataclass_fields__)


def test_result_json_records_settings_departures_history_and_plateau(tmp_path):
    out = tmp_path / "r.json"
    cfg = SSLConfig(data="digits", epochs=4, batch_size=100, probe_epochs=3, probe_every=2,
                    plateau_tol=0.0, out=str(out))
    r = run_ssl(cfg, dataset=_digits(), progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk["settings"]["lr"] == 1e-4 and on_disk["config"]["lr"] is None
    assert on_disk["departures"] == ["batch_size=100 (theirs 500)", "probe_epochs=3 (theirs 400)"]
    rows = on_disk["history"]
    assert [("probe_test_accuracy" in h) for h in rows] == [False, True, False, True]
    assert all(1.0 <= h["effective_rank"] <= 256 and h["feature_rms"] > 0 for h in rows if "effective_rank" in h)
    f = r["final"]
    assert f["stopped_by"] == "budget" and f["epochs_trained"] == 4 and f["plateau_events"] == []
    assert 1.0 <= f["random_encoder_effective_rank"] <= 256
    assert out.with_name("r_training.png").exists()


def test_plateau_rule_values():
    # relative decrease over the window: (L[e-w] - L[e]) / |L[e-w]|
    assert plateau_reached([10, 9, 8.9, 8.85], tol=0.02, window=2)  # (9 - 8.85)/9 = 1.7 %
    assert not plateau_reached([10, 9, 8.9, 8.7], tol=0.02, window=2)  # 3.3 %
    assert not plateau_reached([10, 9], tol=0.5, window=2)  # not enough epochs yet
    assert plateau_reached([9, 9.5], tol=0.0001, window=1)  # a rise counts as flat


class _Engine:
    should_stop = False


def test_plateau_stops_e2e_and_advances_gll():
    rows = [{"epoch": e, "loss": v} for e, v in enumerate([10.0, 5.0, 4.99, 4.98])]
    stop = PlateauStop(rows[:2], tol=0.01, window=1)
    eng = _Engine()
    stop.on_epoch_end(eng, 1)
    assert not eng.should_stop  # 50 % drop
    stop.rows = rows[:3]
    stop.on_epoch_end(eng, 2)
    assert eng.should_stop and stop.events == [{"epoch": 2, "stage": None, "action": "stop"}]

    class Planner:  # GLL: a plateau moves to the next stage; the window restarts there
        stage, stage_start = 0, 0

        def advance(self, epoch):
            if self.stage == 1:
                return False
            self.stage, self.stage_start = 1, epoch + 1
            return True

    planner, eng = Planner(), _Engine()
    stop = PlateauStop(rows[:3], tol=0.01, window=1, planner=planner)
    stop.on_epoch_end(eng, 2)
    assert planner.stage == 1 and planner.stage_start == 3 and not eng.should_stop
    stop.rows = rows
    stop.on_epoch_end(eng, 3)  # one epoch in stage 1: no window yet
    assert not eng.should_stop


def test_effective_rank_closed_forms():
    assert effective_rank(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])) == pytest.approx(1.0)
    iso = torch.cat([torch.eye(4), -torch.eye(4)])  # centred, equal singular values
    assert effective_rank(iso) == pytest.approx(4.0)
    # singular values 3 and 1: p = (3/4, 1/4), exp(H) = exp(-(.75 ln .75 + .25 ln .25))
    f = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert effective_rank(f) == pytest.approx(float(torch.exp(-(0.75 * torch.log(torch.tensor(0.75))
                                                                + 0.25 * torch.log(torch.tensor(0.25))))))


def test_activations_sit_where_the_spec_marks_them():
    assert spec_activations("cifar") == [True, False, True, False, False]
    assert spec_activations("c8-p-c16") == [True, True]  # no 'a' at all: after every layer
    enc = build_encoder("c4-a-c4-p", (1, 4, 4), act="hardtanh")
    assert [s.act_name for s in enc.stages] == ["hardtanh", "linear"]
    x = torch.full((1, 1, 4, 4), 10.0)
    with torch.no_grad():
        for s in enc.stages[0].unit.parameters():
            s.fill_(1.0)
        a, h = enc.stages[0](x)
    assert float(h.max()) == 1.0 and float(a.max()) > 1  # hardtanh clips to [-1, 1]


@pytest.mark.parametrize("views", ["clean+deformed", "two"])
def test_views(views):
    enc = build_encoder("c4-p", (1, 4, 4))
    seen = []

    class Spy(Deform):
        def __call__(self, x, generator):
            seen.append(x.clone())
            return x + 1.0

    sig = ContrastiveSignals(enc, (1, 4, 4), Spy(), tau=6, delta=3, negatives=None, grad_block=False,
                             views=views, generator=torch.Generator())
    from dynsim.engine import Batch

    sig(Batch(x=torch.zeros(3, 16), y=None, index=None, epoch=0, number=0))
    assert len(seen) == (1 if views == "clean+deformed" else 2)


def test_rll_budget_theirs_gives_each_stage_a_full_pass():
    base = dict(data="digits", schedule="rll", epochs=1, batch_size=100, probe_epochs=1, plateau_tol=0.0,
                random_baseline=False, probe_every=0)
    theirs = run_ssl(SSLConfig(**base), dataset=_digits(), progress=False)
    shared = run_ssl(SSLConfig(**base, rll_budget="shared"), dataset=_digits(), progress=False)
    n_stages = 3  # the digits encoder 'tiny'
    assert theirs["history"][0]["batches"] == n_stages * shared["history"][0]["batches"]


def test_effective_rank_from_the_gram_matrix_equals_the_svd_formula():
    """exp(entropy of σ/Σσ) with σ from torch.linalg.svdvals, for wide and tall features."""
    g = torch.Generator().manual_seed(0)
    for shape in ((40, 90), (90, 40)):
        f = torch.randn(shape[0], 6, generator=g) @ torch.randn(6, shape[1], generator=g)
        f += 0.05 * torch.randn(*shape, generator=g)
        c = f.double() - f.double().mean(0)
        p = torch.linalg.svdvals(c)
        p = p / p.sum()
        want = float(torch.exp(-(p * p.log()).sum()))
        assert abs(effective_rank(f) - want) < 1e-9 * want
        assert 6 < want < 40  # low rank plus noise: between the signal rank and full
