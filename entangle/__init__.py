"""entangle: see why preference optimisation moves chosen and rejected log-probs the way it does."""

__version__ = "0.1.0"
