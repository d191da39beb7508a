"""One interface over every model: fairchem v1 GNNs, CHGNet and ASE calculators."""

from kdaug.models.protocol import TAPS, AtomisticModel, EdgeFeatures, ModelOutput
from kdaug.models.registry import load_model, load_named_model, load_teacher

__all__ = ["TAPS", "AtomisticModel", "EdgeFeatures", "ModelOutput", "load_model", "load_named_model", "load_teacher"]
