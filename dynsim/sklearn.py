"""scikit-learn interface: a DSSM network as a transformer.

>>> from sklearn.datasets import load_digits
>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.svm import LinearSVC
>>> from dynsim.sklearn import DSSMTransformer
>>> X, y = load_digits(return_X_y=True)
>>> model = make_pipeline(DSSMTransformer(nps=4, epochs=2), LinearSVC())  # doctest: +SKIP
>>> model.fit(X[:1000] / 16, y[:1000]).score(X[1000:] / 16, y[1000:])     # doctest: +SKIP
0.9...

``fit`` trains the structured Hebbian layer online with the similarity-matching rule
(``images_per_epoch`` draws with replacement per epoch, as ``dynsim run dssm`` does);
``transform`` settles every row from rest and returns the settled rates ``r = f(u)``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from dynsim.errors import ConfigError

__all__ = ["DSSMTransformer"]


class DSSMTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Similarity-matching network (Obeid et al. 2019) as a scikit-learn transformer.

    Parameters
    ----------
    nps : int, default=4
        Neurons per site.
    image_shape : tuple or None, default=None
        ``(H, W)`` or ``(C, H, W)`` of one sample (rows of ``X`` are flat, channel-major).
        ``None``: square grayscale images when ``n_features`` is a perfect square, else a
        1 x ``n_features`` strip (any feature vector, with local receptive fields along it).
    stride, radius : int / float or None
        Site spacing and receptive-field radius in pixels (``None``: the DSSM defaults,
        stride 2 and radius 3 (8x8) or 4; stride 1 on a 1-pixel-high strip).
    lateral_distance, lateral_sign, activation : see :class:`dynsim.HebbianLayer`.
    solver, schedule, threshold, max_steps, residual : settling, as the ``dynsim run dssm`` flags.
    epochs : int, default=5
        Training epochs.
    images_per_epoch : int or None, default=None
        Samples drawn with replacement per epoch (``None``: ``n_samples``).
    batch_size, batch_rule, eta0, eta_decay, eta_min : plasticity, as the CLI flags.
    center : bool, default=True
        Subtract each sample's own mean (the DSSM preprocessing) before fit and transform.
    on_divergence : {"raise", "skip"}, default="raise"
    transform_batch_size : int, default=1000
        Rows settled together in ``transform``.
    random_state : int, RandomState or None, default=0
        Seed of the initial weights and of the sampling order.

    Attributes
    ----------
    layer_ : HebbianLayer, the trained network.
    image_shape_ : (C, H, W) used.
    n_features_in_ : int.
    history_ : list of per-epoch dicts (iterations to settle, learning rate, ...).
    """

    def __init__(
        self,
        nps=4,
        *,
        image_shape=None,
        stride=None,
        radius=None,
        lateral_distance=0.0,
        lateral_sign=-1,
        activation="tanh",
        solver="euler",
        schedule="seed",
        threshold=1e-4,
        max_steps=3000,
        residual="field",
        epochs=5,
        images_per_epoch=None,
        batch_size=1,
        batch_rule="sum",
        eta0=5e-3,
        eta_decay=0.5,
        eta_min=1e-4,
        center=True,
        on_divergence="raise",
        transform_batch_size=1000,
        random_state=0,
    ):
        self.nps = nps
        self.image_shape = image_shape
        self.stride = stride
        self.radius = radius
        self.lateral_distance = lateral_distance
        self.lateral_sign = lateral_sign
        self.activation = activation
        self.solver = solver
        self.schedule = schedule
        self.threshold = threshold
        self.max_steps = max_steps
        self.residual = residual
        self.epochs = epochs
        self.images_per_epoch = images_per_epoch
        self.batch_size = batch_size
        self.batch_rule = batch_rule
        self.eta0 = eta0
        self.eta_decay = eta_decay
        self.eta_min = eta_min
        self.center = center
        self.on_divergence = on_divergence
        self.transform_batch_size = transform_batch_size
        self.random_state = random_state

    # --- helpers ----------------------------------------------------------------
    def _resolve_image_shape(self, n_features: int) -> tuple[int, int, int]:
        if self.image_shape is None:
            side = int(round(np.sqrt(n_features)))
            return (1, side, side) if side * side == n_features else (1, 1, n_features)
        shape = tuple(self.image_shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in shape):
            raise ConfigError(f"image_shape must be (H, W) or (C, H, W) of positive integers, got {self.image_shape!r}")
        if int(np.prod(shape)) != n_features:
            raise ConfigError(f"image_shape {self.image_shape!r} holds {int(np.prod(shape))} values but X has "
                              f"{n_features} features per sample; fix image_shape or leave it None")
        return tuple(int(v) for v in shape)

    def _config(self, n_samples: int, shape: tuple[int, int, int], seed: int):
        from dynsim.builders import DEFAULT_GEOMETRY
        from dynsim.configs.dssm import DSSMConfig

        _, h, w = shape
        d_stride, d_radius = DEFAULT_GEOMETRY.get((h, w), (2, 4.0))
        stride = self.stride if self.stride is not None else (d_stride if min(h, w) >= d_stride else 1)
        radius = self.radius if self.radius is not None else d_radius
        config = DSSMConfig(
            nps=self.nps, stride=stride, radius=radius, lateral_distance=self.lateral_distance,
            lateral_sign=self.lateral_sign, activation=self.activation, solver=self.solver,
            schedule=self.schedule, threshold=self.threshold, max_steps=self.max_steps, residual=self.residual,
            epochs=self.epochs, images_per_epoch=self.images_per_epoch or n_samples,
            batch_size=self.batch_size, batch_rule=self.batch_rule, eta0=self.eta0, eta_decay=self.eta_decay,
            eta_min=self.eta_min, eval_batch_size=self.transform_batch_size, seed=seed,
            on_divergence=self.on_divergence, threads=None, out=None, progress=False,
        )
        return config.validate()

    def _prepare(self, X) -> np.ndarray:
        from dynsim.data import center_per_image

        x = np.asarray(X, dtype=np.float32)
        return center_per_image(x) if self.center else x

    # --- scikit-learn API -----------------------------------------------------------
    def fit(self, X, y=None):
        """Train the network on ``X`` (n_samples, n_features); ``y`` is ignored. Returns ``self``."""
        from dynsim.builders import build_dssm, epoch_batches
        from dynsim.engine import Engine

        X = validate_data(self, X, dtype=[np.float64, np.float32])
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max)) \
            if not isinstance(self.random_state, numbers.Integral) else int(self.random_state)
        shape = self._resolve_image_shape(X.shape[1])
        cfg = self._config(X.shape[0], shape, seed)
        x = torch.as_tensor(self._prepare(X))
        net = build_dssm(cfg, shape)
        layer, solver, stop = net.system, net.solver, net.stop
        engine = Engine(net.settler, [net.rule], progress=False)
        with torch.no_grad():
            engine.fit(epoch_batches(x, images=cfg.images_per_epoch, batch_size=cfg.batch_size, seed=seed),
                       cfg.epochs)
        self.layer_ = layer
        self.image_shape_ = shape
        self.history_ = engine.history
        self._settle = (solver, stop)
        return self

    def transform(self, X):
        """Settled rates (n_samples, n_neurons) of every row of ``X``, from rest, float64."""
        from dynsim.evaluation import settle_dataset

        check_is_fitted(self, "layer_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        solver, stop = self._settle
        with torch.no_grad():
            rep = settle_dataset(self.layer_, self._prepare(X), solver=solver, stop=stop,
                                 batch_size=self.transform_batch_size)
        return rep.r.astype(np.float64)

    @property
    def _n_features_out(self) -> int:
        return self.layer_.state_size

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.requires_fit = True
        return tags
