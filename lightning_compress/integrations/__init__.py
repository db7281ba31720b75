"""Optional third-party extras: ``wandb`` (the only module that imports ``wandb``).

May import: ``lightning_compress.errors``; nothing else of the package.
"""
