"""What evolves: systems give the vector field ``du/ds`` and the readout ``r = f(u)``."""

from dynsim.systems.base import ACTIVATIONS, System
from dynsim.systems.hebbian import HebbianLayer
from dynsim.systems.structure import SiteLinear, lateral_neighbours, receptive_fields

__all__ = ["ACTIVATIONS", "HebbianLayer", "SiteLinear", "System", "lateral_neighbours", "receptive_fields"]
