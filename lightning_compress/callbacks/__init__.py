"""Thin Lightning callbacks, one per technique, built on the functional cores."""

from lightning_compress.callbacks.pruning import MagnitudePruning

__all__ = ["MagnitudePruning"]
