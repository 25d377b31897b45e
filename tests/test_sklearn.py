"""scikit-learn interface: the estimator checks, a pipeline, clone/get_params/set_params."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from dynsim.errors import ConfigError
from dynsim.sklearn import DSSMTransformer

# small and quick: the checks fit dozens of times on tiny random data sets
FAST = dict(nps=2, epochs=1, max_steps=60, images_per_epoch=20)

# checks we must skip, with the reason: none (non-image feature counts are treated as
# 1 x n_features strips, so every shape scikit-learn throws at us is accepted)
EXPECTED_FAILED: dict[str, str] = {}


@parametrize_with_checks([DSSMTransformer(**FAST)], expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_pipeline_with_linear_svc_on_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    model = make_pipeline(DSSMTransformer(nps=4, epochs=1, images_per_epoch=150, max_steps=200), LinearSVC())
    model.fit(X[:400], y[:400])
    assert model.score(X[1000:1300], y[1000:1300]) > 0.8
    dssm = model[0]
    assert dssm.image_shape_ == (1, 8, 8) and dssm.transform(X[:3]).shape == (3, 64)


def test_params_clone_and_set_params():
    est = DSSMTransformer(nps=3, epochs=2)
    assert est.get_params()["nps"] == 3
    twin = clone(est.set_params(nps=5))
    assert twin.get_params() == est.get_params() and twin is not est


def test_same_random_state_same_features():
    X = np.random.default_rng(0).random((30, 16))
    a = DSSMTransformer(**FAST).fit_transform(X)
    b = DSSMTransformer(**FAST).fit_transform(X)
    assert np.array_equal(a, b)


def test_image_shape_checked_and_strips_accepted():
    X = np.random.default_rng(0).random((10, 12))
    with pytest.raises(ConfigError, match="image_shape"):
        DSSMTransformer(image_shape=(3, 3), **FAST).fit(X)
    assert DSSMTransformer(**FAST).fit(X).image_shape_ == (1, 1, 12)
    assert DSSMTransformer(image_shape=(3, 2, 2), **FAST).fit(X).image_shape_ == (3, 2, 2)
    with pytest.raises(ConfigError, match="--nps"):
        DSSMTransformer(nps=0).fit(X)
