"""One analysis of a model's dataflow, built on a real batch, cached and shared by every technique.

No Lightning, and no tracing of the model's code for the walk: one eval forward pass with module
hooks records which module consumed which tensor (by identity and in-place version), which works
for Sequential, ResNet-style and functional-style models alike. From it, :class:`ModelGraph` holds,
by module name (no tensors are kept):

- ``bn_pairs``: which Conv/Linear output feeds a BatchNorm directly (pruning masks those
  BatchNorms along with the channels, quantisation folds them);
- ``reaches``: where a module's output goes when it passes only through ReLU / MaxPool / Flatten /
  Identity / Dropout modules (quantisation then lets one range serve both ends);
- :meth:`ModelGraph.couplings`: groups of layers whose output channels are one set (they feed the
  same residual add), from Torch-Pruning's dependency graph, traced once on first use;
- :meth:`ModelGraph.links`: where each layer's output channels land further on — in every BatchNorm
  that normalises them (DenseNet's concatenations reach many) and in the inputs of grouped convolutions
  (ResNeXt, RegNet), whose groups must each lose the same number of channels.

:func:`analyze` caches the graph per model object and builds it again when the model's structure
changes (module replacement through :mod:`lightning_compress.core.surgery` also calls
:func:`invalidate`), so pruning, quantisation and the export share one walk and one trace.

Example::

    graph = analyze(model, batch[:2])
    graph.bn_pairs        # {"features.0": "features.1", ...}
"""

from __future__ import annotations

import signal
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.core.layers import BN_TYPES, LAYER_TYPES, is_internal, weight_of

RANGE_PRESERVING_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip


@dataclass(frozen=True)
class ChannelLink:
    """Where a layer's output channels land in another module, as Torch-Pruning's dependency graph sees it.

    Attributes:
        target: the module's name.
        kind: ``norm`` (a BatchNorm normalises them: a pruned channel must be masked there too, or the
            BatchNorm turns its zeros into a constant) or ``grouped`` (they are inputs or outputs of a
            grouped convolution, whose groups must each keep the same number of them).
        index: ``{channel of the layer: channel of the target}``.
        producers: every Conv/Linear layer that writes into these channels of the target (the layer and
            the layers coupled to it, e.g. through a residual add): a channel there is zero only if it
            is zero in all of them.
        groups: for ``grouped``, the convolution's number of groups (its inputs, and its outputs, are that
            many equal, contiguous segments).
        channels: the target's number of channels (for ``grouped``, of the side the layer's channels reach).
            Links whose numbering does not fit the layer and the target (Torch-Pruning's index mapping
            through a reshape, e.g. ShuffleNet's channel shuffle) are left out.
    """

    target: str
    kind: str
    index: Mapping[int, int]
    producers: tuple[str, ...]
    groups: int = 1
    channels: int = 0

    def segment(self, channel: int) -> int:
        """The grouped convolution's group that the layer's ``channel`` feeds."""
        return self.index[channel] // (self.channels // self.groups)


@dataclass
class ModelGraph:
    """What one forward pass revealed about a model, by module name.

    Attributes:
        signature: the structure the graph was built for (names and types of the model's modules).
        bn_pairs: ``{layer: BatchNorm}`` for every Conv/Linear whose output a BatchNorm consumes unchanged.
        reaches: ``{module: next module}``: the first module that is not range-preserving reached
            from a module's output along a single path through range-preserving modules.
        called: the leaf modules the forward pass called (a layer whose weight is read without calling
            the layer, as torchvision's Swin attention does, is not among them).
    """

    signature: tuple[tuple[str, str], ...]
    bn_pairs: dict[str, str] = field(default_factory=dict)
    reaches: dict[str, str] = field(default_factory=dict)
    called: set[str] = field(default_factory=set)
    _couplings: list[list[str]] | None = None
    _entangled: dict[str, str] = field(default_factory=dict)
    _links: dict[str, list[ChannelLink]] = field(default_factory=dict)
    _untraced: str | None = None

    def couplings(self, model: nn.Module, example: Any, layers: Mapping[str, nn.Module]) -> list[list[str]]:
        """Groups of ``layers`` whose output channels are one set (Torch-Pruning's dependency graph).

        Traced once per structure (the first call); a model Torch-Pruning cannot trace has no groups
        (each layer is then pruned on its own).
        """
        self._trace(model, example)
        groups = [[n for n in group if n in layers] for group in self._couplings or []]
        return [g for g in groups if len(g) > 1]

    def entangled(self, model: nn.Module, example: Any) -> dict[str, str]:
        """``{layer: why}`` of the layers whose output channels cannot be pruned one by one: their channels
        reach a LayerNorm / GroupNorm (which normalises them together, so a zero channel still changes the
        others) or an ``nn.MultiheadAttention`` (the residual stream of a transformer). Traced with
        :meth:`couplings`."""
        self._trace(model, example)
        return dict(self._entangled)

    def links(self, model: nn.Module, example: Any) -> dict[str, list[ChannelLink]]:
        """``{layer: [ChannelLink, ...]}``: the BatchNorms and grouped convolutions each Conv/Linear layer's
        output channels reach, with the channel numbering there (traced with :meth:`couplings`)."""
        self._trace(model, example)
        return self._links

    def untraced(self, model: nn.Module, example: Any) -> str | None:
        """Why Torch-Pruning's trace gave no couplings and links (it failed, found strided slicing, or took
        longer than :data:`TRACE_SECONDS`), or ``None`` when it succeeded."""
        self._trace(model, example)
        return self._untraced

    def _trace(self, model: nn.Module, example: Any) -> None:
        if self._couplings is None:
            try:
                with time_limit(TRACE_SECONDS, "Torch-Pruning's coupling trace"):
                    traced = _couplings_of(model, dependency_graph(model, example))
                self._couplings, self._entangled, self._links = traced
            except Exception as error:  # untraceable, unbounded or too slow: each layer is pruned alone
                self._couplings, self._entangled, self._links = [], {}, {}
                self._untraced = f"{type(error).__name__}: {str(error)[:200]}"


_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelGraph] = weakref.WeakKeyDictionary()


def signature(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """The model's structure as the analysis sees it: every module's name and (unparametrized) type.

    Fake quantisers and parametrization containers are left out, so attaching or enabling
    quantisation does not change it; replacing a layer does.
    """
    return tuple(
        (name, parametrize.type_before_parametrizations(module).__name__)
        for name, module in model.named_modules()
        if not is_internal(name, module)
    )


def analyze(model: nn.Module, example: Any) -> ModelGraph:
    """The :class:`ModelGraph` of ``model``: cached, built with one eval forward of ``example`` when
    missing or when the structure changed."""
    current = signature(model)
    graph = _CACHE.get(model)
    if graph is None or graph.signature != current:
        graph = _build(model, example, current)
        _CACHE[model] = graph
    return graph


def invalidate(model: nn.Module) -> None:
    """Forget the cached analysis of ``model`` (the next :func:`analyze` builds it again)."""
    _CACHE.pop(model, None)


def find_bn_pairs(model: nn.Module, layers: Mapping[str, nn.Module], example: Any) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for every one of ``layers`` whose output feeds a BatchNorm directly."""
    return {name: bn for name, bn in analyze(model, example).bn_pairs.items() if name in layers}


def coupled_layers(model: nn.Module, layers: Mapping[str, nn.Module], example: Any) -> list[list[str]]:
    """Groups of ``layers`` whose output channels are one set (see :meth:`ModelGraph.couplings`)."""
    return analyze(model, example).couplings(model, example, layers)


def channel_links(model: nn.Module, example: Any) -> dict[str, list[ChannelLink]]:
    """``{layer: [ChannelLink, ...]}`` (see :meth:`ModelGraph.links`)."""
    return analyze(model, example).links(model, example)


def channel_segments(links: Sequence[ChannelLink], channels: int) -> list[int] | None:
    """A segment number for each of a layer's ``channels`` such that keeping the same number of channels
    in every segment keeps every grouped convolution they reach (``links``) removable, or ``None``: they
    reach none, or reach them unevenly (then the removal keeps what cannot go evenly)."""
    grouped = [link for link in links if link.kind == "grouped"]
    if not grouped:
        return None
    keys = [
        tuple((link.target, link.segment(i)) if i in link.index else None for link in grouped) for i in range(channels)
    ]
    number = {key: n for n, key in enumerate(dict.fromkeys(keys))}
    segments = [number[key] for key in keys]
    sizes = {segments.count(n) for n in number.values()}
    return segments if len(sizes) == 1 else None


def is_grouped(layer: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (ResNeXt's, RegNet's): its channels come in groups that
    must keep equal sizes (a depthwise convolution's channels go one by one with their input's)."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.groups == 1:
        return False
    return not layer.groups == layer.in_channels == layer.out_channels


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise (or otherwise grouped-but-not-:func:`is_grouped`) conv: its channels go with its input's,
    so it is never the root of a channel group."""
    return isinstance(layer, nn.Conv2d) and layer.groups != 1 and not is_grouped(layer)


def untraced(model: nn.Module, example: Any) -> str | None:
    """Why the model's channel couplings could not be traced, or ``None`` (see :meth:`ModelGraph.untraced`)."""
    return analyze(model, example).untraced(model, example)


def entangled_layers(model: nn.Module, example: Any) -> dict[str, str]:
    """``{layer: why}`` of the layers whose channels cannot be pruned one by one (see :meth:`ModelGraph.entangled`)."""
    return analyze(model, example).entangled(model, example)


@dataclass
class _Call:
    """One module call seen by :func:`_module_calls`: what it consumed (and at which in-place version)."""

    name: str
    version: int
    result: Tensor | None = None
    result_version: int = 0


def _module_calls(model: nn.Module, example: Any) -> tuple[dict[int, list[_Call]], dict[str, _Call], list[Any]]:
    """One eval forward: the leaf-module calls consuming each tensor (by id), each module's last call,
    and the tensors seen (kept alive by the caller so that their ids are not reused).

    A Conv/Linear counts as a leaf consuming its input before any input quantiser; outputs are
    taken after forward hooks (what the next module really receives). Tensor versions tell an
    unseen in-place change (``out += identity``) from the tensor a module returned.
    """
    consumers: dict[int, list[_Call]] = {}
    last: dict[str, _Call] = {}
    keep: list[Any] = []
    handles = []
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None or isinstance(module, LAYER_TYPES)
        if not leaf or is_internal(name, module):
            continue

        def before(m: nn.Module, args: tuple[Any, ...], n: str = name) -> None:
            x = args[0] if args else None
            call = _Call(n, x._version if isinstance(x, Tensor) else -1)
            if isinstance(x, Tensor):
                consumers.setdefault(id(x), []).append(call)
                keep.append(x)
            last[n] = call

        def after(m: nn.Module, args: tuple[Any, ...], out: Any, n: str = name) -> None:
            if isinstance(out, Tensor):
                last[n].result, last[n].result_version = out, out._version
                keep.append(out)

        handles.append(module.register_forward_pre_hook(before, prepend=True))
        handles.append(module.register_forward_hook(after))
    _run_eval(model, example, handles)
    return consumers, last, keep


def _run_eval(model: nn.Module, example: Any, handles: list[Any]) -> None:
    was_training = model.training
    args = example if isinstance(example, tuple) else (example,)
    try:
        model.eval()
        # Lightning tests under inference mode; its tensors have no version counter: run normally.
        with torch.inference_mode(False), torch.no_grad():
            model(*(a.clone() if isinstance(a, Tensor) else a for a in args))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def _build(model: nn.Module, example: Any, structure: tuple[tuple[str, str], ...]) -> ModelGraph:
    consumers, last, _keep = _module_calls(model, example)
    modules = dict(model.named_modules())
    graph = ModelGraph(structure)
    graph.called = set(last)
    for name, produced in last.items():
        if produced.result is None:
            continue
        if isinstance(modules[name], LAYER_TYPES):
            for call in consumers.get(id(produced.result), []):
                if call.version == produced.result_version and isinstance(modules[call.name], BN_TYPES):
                    graph.bn_pairs[name] = call.name
                    break
        reached = _reach(produced, consumers, modules)
        if reached is not None:
            graph.reaches[name] = reached
    return graph


def _reach(produced: _Call, consumers: Mapping[int, list[_Call]], modules: Mapping[str, nn.Module]) -> str | None:
    """The first module that is not range-preserving on the single path from ``produced``'s output."""
    tensor, version = produced.result, produced.result_version
    followed: set[int] = set()
    while tensor is not None:
        calls = [c for c in consumers.get(id(tensor), []) if c.version == version and id(c) not in followed]
        in_place = [c for c in calls if c.result is tensor and isinstance(modules[c.name], RANGE_PRESERVING_TYPES)]
        if len(in_place) == 1:  # an in-place ReLU (one version later) or an Identity (the same tensor) goes on
            followed.add(id(in_place[0]))
            version = in_place[0].result_version
            continue
        if len(calls) != 1:
            return None
        call = calls[0]
        if not isinstance(modules[call.name], RANGE_PRESERVING_TYPES):
            return call.name
        tensor, version = call.result, call.result_version
    return None


def prune_out_fn(layer: nn.Module) -> Any:
    """Torch-Pruning's function that removes output channels of a Conv/Linear ``layer``."""
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


TRACE_SECONDS = 30.0  # a dependency trace (and the channel groups read off it) that takes longer is abandoned


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in the ``with`` block after ``seconds``, and again every second until the block
    has left (code that swallows the first one, as Torch-Pruning's trace does with a bare ``except:``
    around the model's forward, is stopped by the next). A SIGALRM timer; where there is none, in a
    thread other than the main one or on Windows, the block runs unbounded."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


UNBOUNDED_OPS = ("_SliceOp",)  # Torch-Pruning nodes whose index mapping has no bound (Swin: > 8 GB, killed)


def dependency_graph(model: nn.Module, example: Any) -> Any:
    """Torch-Pruning's dependency graph of ``model`` (traced through autograd, in eval mode so that
    BatchNorm statistics do not move); raises whatever the trace raises.

    Raises:
        RuntimeError: the graph holds strided slicing (e.g. Swin's patch merging), through which
            Torch-Pruning's channel groups grow without bound: callers keep per-layer masks instead.
    """
    import torch_pruning as tp

    was_training = model.training
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            model.eval()
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)
    unbounded = sorted({type(node.module).__name__ for node in graph.module2node.values()} & set(UNBOUNDED_OPS))
    if unbounded:
        raise RuntimeError(
            f"the model slices tensors ({', '.join(unbounded)}): Torch-Pruning's channel groups through strided "
            "slices have no bound, so channel couplings are not traced"
        )
    return graph


ENTANGLING_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)


def _couplings_of(
    model: nn.Module, graph: Any
) -> tuple[list[list[str]], dict[str, str], dict[str, list[ChannelLink]]]:
    modules = dict(model.named_modules())
    layers = {name: m for name, m in modules.items() if isinstance(m, LAYER_TYPES)}
    names = {id(m): n for n, m in modules.items()}
    parent = {n: n for n in layers}
    entangled: dict[str, str] = {}
    links: dict[str, list[ChannelLink]] = {}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for name, layer in layers.items():
        if is_depthwise(layer) or layer not in graph.module2node:  # a depthwise conv goes with its input; unused
            continue
        channels = int(weight_of(layer).shape[0])
        group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=[0])
        linked = [item.dep.target.module for item in group]
        if any(isinstance(t, BN_TYPES) or is_grouped(t) for t in linked if isinstance(t, nn.Module)):
            # every channel's numbering there (cheap for convs; through attention's reshapes, seconds a layer)
            group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=list(range(channels)))
        producers = tuple(
            names[id(dep.target.module)] for dep, _ in group
            if isinstance(dep.target.module, LAYER_TYPES) and _handler(dep) == "prune_out_channels"
        )  # fmt: skip
        for item in group:
            dep, target = item.dep, item.dep.target.module
            other = names.get(id(target))
            if other is not None and other in layers and other != name and _handler(dep) == "prune_out_channels":
                parent[root(other)] = root(name)
            if isinstance(target, ENTANGLING_TYPES):
                entangled[name] = f"its channels reach a {type(target).__name__}, which mixes them"
            elif type(target).__name__ == "_SplitOp":
                entangled[name] = "its channels are split (chunk / split: ShuffleNet's branches, attention's q/k/v)"
            index = {int(r): int(i) for r, i in zip(item.root_idxs, item.idxs, strict=True)}
            if isinstance(target, BN_TYPES) and other is not None:
                link = ChannelLink(other, "norm", index, producers, channels=_features(target))
            elif other is not None and is_grouped(target):  # its inputs, or its outputs (coupled, or itself)
                size = target.in_channels if _handler(dep) == "prune_in_channels" else target.out_channels
                link = ChannelLink(other, "grouped", index, producers, target.groups, size)
            else:
                continue
            if set(index) <= set(range(channels)) and set(index.values()) <= set(range(link.channels)):
                links.setdefault(name, []).append(link)  # (through a channel shuffle the numbering is lost)
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(root(name), []).append(name)
    return [g for g in groups.values() if len(g) > 1], entangled, links


def _handler(dep: Any) -> str:
    return str(getattr(dep.handler, "__name__", ""))


def _features(norm: nn.Module) -> int:
    """A BatchNorm's number of channels (affine or not)."""
    assert isinstance(norm, nn.modules.batchnorm._NormBase)
    return int(norm.num_features)
