"""Vision helpers for the demo, the recipes and the tests: data modules (``data``), built-in and
torchvision models (``models``) and ``ClassificationModule`` (``module``).

May import: ``lightning_compress.errors`` and ``vision`` itself (plus Lightning, torchvision); no
compression layer.
"""
