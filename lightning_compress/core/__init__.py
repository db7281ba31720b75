"""Functional cores: plain ``torch.nn.Module`` in, masks or a new module out; no Lightning.

``layers`` (the one Conv/Linear type list, selection by name, the stored weight), ``graph`` (the one
cached analysis of a model's dataflow: Conv->BN pairs, shared ranges, residual couplings),
``schedules``, ``pruning``, ``quantization/`` (config, fake-quant ops, attaching), ``distillation``,
``low_rank``, ``surgery`` (changing a model and its optimizers mid-run, instance patches) and
``calibration`` (BatchNorm statistics recomputed from data) and ``attention`` (``nn.MultiheadAttention``
with its projections as called layers).

May import: ``lightning_compress.errors`` and ``core`` itself (plus torch, Torch-Pruning); never
Lightning, never a layer above.
"""
