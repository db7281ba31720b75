"""Configuration: recipes read (``load``), checked (``schema``) and turned into objects (``build``).

May import: ``lightning_compress.errors``, ``core``, ``deploy``, ``vision``, ``callbacks``, ``integrations`` (the
W&B logger's options) and Lightning.
Nothing below imports this package.
"""

from lightning_compress.config.build import Recipe, build_trainer
from lightning_compress.config.load import load_recipe
from lightning_compress.config.schema import validate

__all__ = ["Recipe", "build_trainer", "load_recipe", "validate"]
