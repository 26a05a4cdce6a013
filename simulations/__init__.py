"""Hydra-driven Flower simulations of fedvi (``python -m simulations.run``)."""
