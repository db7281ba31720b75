"""One analysis of a model's dataflow, built on a real batch, cached and shared by every technique.

No Lightning, and no tracing of the model's code for the walk: one eval forward pass with module
hooks records which module consumed which tensor (by identity and in-place version), which works
for Sequential, ResNet-style and functional-style models alike. From it, :class:`ModelGraph` holds,
by module name (no tensors are kept):

- ``bn_pairs``: which Conv/Linear output feeds a BatchNorm directly (pruning masks those
  BatchNorms along with the channels, quantisation folds them);
- ``reaches``: where a module's output goes when it passes only through ReLU / ReLU6 / MaxPool / Flatten /
  Identity / Dropout modules (quantisation then lets one range serve both ends);
- ``tails``: where such a path ends in code outside the modules instead (``F.avg_pool2d``, ``torch.flatten``
  in a ``forward``): its last module (quantisation then quantises there, after the ReLU and the pooling);
- ``sums``: the modules whose output is a sum of two tensors computed in their own ``forward`` (a residual
  ``x + f(x)``, as in MobileNetV2 and EfficientNet blocks), which module hooks can quantise; the ops that code
  outside the leaf modules runs are recorded during the same pass (a ``TorchFunctionMode``), so a tensor that
  a module *and* such code consume is known to branch;
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from lightning_compress.core.layers import BN_TYPES, LAYER_TYPES, is_internal, weight_of

RANGE_PRESERVING_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
SCALE_PRESERVING_TYPES: tuple[type[nn.Module], ...] = (
    *BN_TYPES, *RANGE_PRESERVING_TYPES, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip  # modules a per-channel positive scale may pass (within limits: see core.equalization)




def preserves_range(module: nn.Module) -> bool:
    """Whether quantising ``module``'s input with the range observed at its output gives what quantising its
    output gives: the :data:`RANGE_PRESERVING_TYPES`, and a ReLU6 / ``Hardtanh(a, b)`` with ``a <= 0 <= b``
    (the output's range, which always holds 0, lies inside the clip, so clipping first changes no quantised
    value: ONNX Runtime removes such a Clip before a QuantizeLinear)."""
    if isinstance(module, RANGE_PRESERVING_TYPES):
        return True
    return isinstance(module, nn.Hardtanh) and module.min_val <= 0 <= module.max_val


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


@dataclass(frozen=True)
class Sum:
    """A module whose output is the sum of two same-shaped tensors, computed by its own code (``x + f(x)``).

    Attributes:
        operands: for each of the two summands, the modules whose output it is (a leaf and the modules that
            returned it, e.g. ``("features.3.conv.3", "features.3.conv")``; empty where no module made it).
            Which layers read the sum: :attr:`ModelGraph.inputs`.
    """

    operands: tuple[tuple[str, ...], tuple[str, ...]]


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
        tails: ``{module: last module}``: where a module's output passes only range-preserving modules, each
            called once, and then only code outside the modules reads it (a functional op), the last of them.
        chains: ``{layer: (module, ..., next layer)}``: the Conv/Linear a layer's output reaches along a single
            path of :data:`SCALE_PRESERVING_TYPES` modules (BatchNorm, ReLU, ReLU6, pooling, ...), the modules
            passed on the way first (cross-layer equalisation's candidate pairs). A tensor also used by code
            the module hooks do not see (``x + y``) ends no chain.
        sums: ``{module: Sum}``, in call order: the modules (called once) whose output is a residual sum they
            compute themselves (see :class:`Sum`).
        inputs: ``{layer: (module, ...)}``: for each Conv/Linear called, the modules whose output is exactly its
            input (a leaf, and the modules that returned that tensor unchanged; empty where code made it).
    """

    signature: tuple[tuple[str, str], ...]
    bn_pairs: dict[str, str] = field(default_factory=dict)
    reaches: dict[str, str] = field(default_factory=dict)
    tails: dict[str, str] = field(default_factory=dict)
    called: set[str] = field(default_factory=set)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sums: dict[str, Sum] = field(default_factory=dict)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
    source: int = 0  # the input's id
    result: Tensor | None = None
    result_version: int = 0


Key = tuple[int, int]  # a tensor at one in-place version: (id, version)

_SUM_OPS = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}


def _version(x: Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _tensor_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Tensor]:
    found = []
    for arg in (*args, *kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, Tensor):
                found.append(item)
    return found


class _Functional(TorchFunctionMode):
    """Records, during the analysis forward, the tensors that code outside leaf modules consumes (``used``)
    and the two-tensor sums it computes (``sums``: result -> the summands), by :data:`Key`."""

    def __init__(self, keep: list[Any]) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside a leaf module's call: its own ops are the module's business
        self.used: set[Key] = set()
        self.sums: dict[Key, tuple[Key, Key]] = {}
        self.keep = keep

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        inputs = [(x, (id(x), _version(x))) for x in _tensor_args(args, kwargs)]
        result = func(*args, **kwargs)
        if not isinstance(result, Tensor):  # shape queries and the like consume no data
            return result
        self.used.update(key for _, key in inputs)
        self.keep.extend(x for x, _ in inputs)
        summands = [x for x, _ in inputs]
        if (
            func in _SUM_OPS and len(inputs) == 2 and "alpha" not in kwargs and summands[0] is not summands[1]
            and summands[0].shape == summands[1].shape == result.shape and result.is_floating_point()
        ):  # fmt: skip
            self.sums[(id(result), _version(result))] = (inputs[0][1], inputs[1][1])
            self.keep.append(result)
        return result


@dataclass
class _Pass:
    """What :func:`_module_calls` saw."""

    consumers: dict[int, list[_Call]]  # the leaf-module calls consuming each tensor (by id)
    last: dict[str, _Call]  # each leaf module's last call
    functional: _Functional
    produced: dict[Key, list[str]]  # the modules (leaf or not) whose output a tensor is, innermost first
    raw: dict[str, Key]  # each non-leaf module called once: its output before any forward hook
    keep: list[Any]  # every tensor seen, kept alive so that ids are not reused
    counts: dict[str, int] = field(default_factory=dict)  # how often each leaf module was called


def _module_calls(model: nn.Module, example: Any) -> _Pass:
    """One eval forward, with every leaf module's and non-leaf module's calls recorded (see :class:`_Pass`).

    A Conv/Linear counts as a leaf consuming its input before any input quantiser; outputs are
    taken after forward hooks (what the next module really receives). Tensor versions tell an
    unseen in-place change (``out += identity``) from the tensor a module returned.
    """
    keep: list[Any] = []
    seen = _Pass({}, {}, _Functional(keep), {}, {}, keep)
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if is_internal(name, module):
            continue
        leaf = next(module.children(), None) is None or isinstance(module, LAYER_TYPES)
        if leaf:
            handles.append(module.register_forward_pre_hook(partial(_leaf_before, seen, name), prepend=True))
        handles.append(module.register_forward_hook(partial(_raw_output, seen, calls, name, leaf), prepend=True))
        handles.append(module.register_forward_hook(partial(_output, seen, name, leaf)))
    with seen.functional:
        _run_eval(model, example, handles)
    for name, count in calls.items():
        if count != 1:
            seen.raw.pop(name, None)
    return seen


def _leaf_before(seen: _Pass, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    call = _Call(name, _version(x) if isinstance(x, Tensor) else -1, id(x))
    if isinstance(x, Tensor):
        seen.consumers.setdefault(id(x), []).append(call)
        seen.keep.append(x)
    seen.last[name] = call
    seen.counts[name] = seen.counts.get(name, 0) + 1
    seen.functional.depth += 1


def _raw_output(seen: _Pass, calls: dict[str, int], name: str, leaf: bool, m: nn.Module, a: Any, out: Any) -> None:
    if leaf:
        return
    calls[name] = calls.get(name, 0) + 1
    if isinstance(out, Tensor):
        seen.raw[name] = (id(out), _version(out))
        seen.keep.append(out)


def _output(seen: _Pass, name: str, leaf: bool, m: nn.Module, a: Any, out: Any) -> None:
    if leaf:  # the last hook of the call: its quantisers' ops were the module's too
        seen.functional.depth -= 1
    if not isinstance(out, Tensor):
        return
    if leaf:
        seen.last[name].result, seen.last[name].result_version = out, _version(out)
    seen.produced.setdefault((id(out), _version(out)), []).append(name)
    seen.keep.append(out)


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
    seen = _module_calls(model, example)
    consumers, last, used = seen.consumers, seen.last, seen.functional.used
    modules = dict(model.named_modules())
    graph = ModelGraph(structure)
    graph.called = set(last)
    for name, produced in last.items():
        if isinstance(modules[name], LAYER_TYPES):
            graph.inputs[name] = tuple(seen.produced.get((produced.source, produced.version), []))
        if produced.result is None:
            continue
        if isinstance(modules[name], LAYER_TYPES):
            for call in consumers.get(id(produced.result), []):
                if call.version == produced.result_version and isinstance(modules[call.name], BN_TYPES):
                    graph.bn_pairs[name] = call.name
                    break
        reached = _path(produced, consumers, used, modules, preserves_range)
        if reached is not None:
            graph.reaches[name] = reached[-1]
        else:
            tail = _tail(produced, consumers, used, modules, seen.counts)
            if tail is not None:
                graph.tails[name] = tail
        chain = _path(produced, consumers, used, modules, lambda m: isinstance(m, SCALE_PRESERVING_TYPES))
        if chain is not None and isinstance(modules[name], LAYER_TYPES) and isinstance(modules[chain[-1]], LAYER_TYPES):
            graph.chains[name] = chain
    claimed: set[Key] = set()
    for name, raw in seen.raw.items():  # in the order the calls returned: inner modules first
        summands = seen.functional.sums.get(raw)
        if summands is None or raw in claimed:  # (an outer module returning an inner module's sum: the inner's)
            continue
        claimed.add(raw)
        operands = [tuple(seen.produced.get(key, [])) for key in summands]
        graph.sums[name] = Sum((operands[0], operands[1]))
    return graph


def _path(
    produced: _Call, consumers: Mapping[int, list[_Call]], used: set[Key], modules: Mapping[str, nn.Module],
    passing: Callable[[nn.Module], bool],
) -> tuple[str, ...] | None:  # fmt: skip
    """The modules on the single path from ``produced``'s output through modules ``passing`` accepts, ending with the
    first module it does not; ``None`` where the path branches (also into code outside the modules: ``used``) or
    ends first."""
    tensor, version = produced.result, produced.result_version
    followed: set[int] = set()
    path: list[str] = []
    while tensor is not None:
        if (id(tensor), version) in used:
            return None
        calls = [c for c in consumers.get(id(tensor), []) if c.version == version and id(c) not in followed]
        in_place = [c for c in calls if c.result is tensor and passing(modules[c.name])]
        if len(in_place) == 1:  # an in-place ReLU (one version later) or an Identity (the same tensor) goes on
            followed.add(id(in_place[0]))
            version = in_place[0].result_version
            path.append(in_place[0].name)
            continue
        if len(calls) != 1:
            return None
        call = calls[0]
        path.append(call.name)
        if not passing(modules[call.name]):
            return tuple(path)
        tensor, version = call.result, call.result_version
    return None


def _tail(
    produced: _Call, consumers: Mapping[int, list[_Call]], used: set[Key], modules: Mapping[str, nn.Module],
    counts: Mapping[str, int],
) -> str | None:  # fmt: skip
    """The last module of the single path from ``produced``'s output through range-preserving modules that are
    called once, where only code outside the modules (``used``) reads the path's end; else ``None`` (no such
    module on the way, a branch, a module that does not preserve the range, or a module called again)."""
    tensor, version = produced.result, produced.result_version
    followed: set[int] = set()
    last: str | None = None
    while tensor is not None:
        calls = [c for c in consumers.get(id(tensor), []) if c.version == version and id(c) not in followed]
        if not calls:
            return last if (id(tensor), version) in used else None
        if (id(tensor), version) in used or len(calls) != 1:
            return None
        call = calls[0]
        if not preserves_range(modules[call.name]) or counts.get(call.name, 0) != 1:
            return None
        followed.add(id(call))
        last = call.name
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
