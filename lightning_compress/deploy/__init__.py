"""Deployment: what leaves the run. ``onnx`` (fp32 and int8 QDQ files), ``shrink`` (physical channel
removal), ``verify`` (ONNX Runtime against PyTorch), ``measure`` (params, bytes, MACs, latency),
``report`` (JSON, Markdown, plots), ``bundle`` (the whole folder, verified, written atomically) and
``restore`` (a compressed model rebuilt from a plain checkpoint in a fresh process), ``cpu`` (the int8 weight type
ONNX Runtime computes exactly on this CPU).

May import: ``lightning_compress.errors``, ``core`` and ``deploy`` itself; never Lightning.
"""
