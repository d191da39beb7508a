"""kdaug: synthetic and augmented training data for distilling molecular GNNs."""

__version__ = "0.1.0"
