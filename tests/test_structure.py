"""Structured connectivity against the numbers of DESIGN §2 and against dense matrices."""

import math

import pytest
import torch

from dynsim import ConfigError, HebbianLayer
from dynsim.systems.structure import lateral_neighbours, receptive_fields


def test_mnist_structure_numbers():
    layer = HebbianLayer((1, 28, 28), nps=4, stride=2, radius=4.0)
    assert layer.n_sites == 196 and layer.state_size == 784
    fan_in = layer.ff.fan_in
    assert fan_in.max() == 52  # an interior site sees a 52-pixel disc
    site = 7 * 14 + 7  # interior site (7, 7)
    assert fan_in[site] == 52
    assert layer.ff.nnz == 35_968
    assert layer.lateral.nnz == 3_136
    assert layer.mean_fan_in == pytest.approx(8992 / 196)
    stored = layer.ff.weight[layer.ff.mask.expand_as(layer.ff.weight) > 0]
    assert stored.std().item() == pytest.approx(1 / math.sqrt(45.88), rel=0.03)  # ≈ 0.148


def test_no_dense_storage_for_nps_100():
    layer = HebbianLayer((1, 28, 28), nps=100)
    n = layer.state_size
    assert n == 19_600
    stored = layer.ff.weight.numel() + layer.lateral.weight.numel()
    assert stored < 0.02 * n * (n + 784)  # far below the dense N×(N+D) form


def test_receptive_field_is_disc_around_site_centre():
    index, valid = receptive_fields(28, 28, stride=2, radius=4.0)
    pix = index[7 * 14 + 7][valid[7 * 14 + 7]]
    rows, cols = pix // 28 + 0.5, pix % 28 + 0.5
    d2 = (rows - 15.0) ** 2 + (cols - 15.0) ** 2
    assert (d2 <= 16).all() and len(pix) == 52


def test_lateral_neighbours_distance_one():
    index, valid = lateral_neighbours(3, 3, distance=1.0)
    assert valid.sum(1).tolist() == [3, 4, 3, 4, 5, 4, 3, 4, 3]
    assert index[4][0] == 4  # itself first


@pytest.mark.parametrize(
    "shape,kw", [((1, 28, 28), {}), ((3, 8, 8), {"nps": 2, "radius": 3.0, "lateral_distance": 1.0})]
)
def test_sparse_maps_equal_dense(shape, kw):
    layer = HebbianLayer(shape, **kw)
    layer.lateral.weight.add_(0.1 * torch.randn_like(layer.lateral.weight) * layer.lateral.mask)
    w, lat = layer.dense_weights()
    x = torch.randn(3, layer.input_size)
    assert torch.allclose(layer.drive(x), x @ w.T, atol=1e-5)
    r = torch.randn(3, layer.state_size)
    assert torch.allclose(layer.lateral_input(r), r @ (lat - torch.eye(layer.state_size)).T, atol=1e-5)


def test_multichannel_counts():
    layer = HebbianLayer((3, 32, 32), nps=4, stride=2, radius=4.0)
    assert layer.n_sites == 256
    assert layer.ff.fan_in.max() == 3 * 52


def test_init_lateral_is_identity():
    layer = HebbianLayer((1, 8, 8), nps=3, stride=2, radius=3.0)
    _, lat = layer.dense_weights()
    assert torch.equal(lat, torch.eye(layer.state_size))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"nps": 0}, "nps"),
        ({"stride": 0}, "stride"),
        ({"radius": -1.0}, "radius"),
        ({"lateral_sign": 2}, "lateral_sign"),
        ({"activation": "softmax"}, "activation"),
        ({"stride": 40}, "larger than"),
    ],
)
def test_bad_structure_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        HebbianLayer((1, 28, 28), **kw)
