"""``KnowledgeDistillation``: a frozen teacher teaches the student inside an ordinary ``lightning.Trainer``.

The callback only decides *where* the losses meet; they come from
:mod:`lightning_compress.core.distillation`. The user's ``training_step`` stays as written: for the
length of a fit the callback wraps it on the instance
(:class:`~lightning_compress.callbacks.step_patch.TrainingStepPatch`), watches the module's output
with a forward hook, runs the teacher on the same batch and returns
``(1 - alpha) * task + alpha * KD (+ feature_weight * feature loss)`` in its place.

With ``teacher="self"`` the teacher is a frozen, dense, float copy of the model itself, taken just before the
first compression callback of the Trainer changes the model (:meth:`CompressionCallback.on_before_model_change`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.callbacks.base import (
    CompressionCallback,
    batch_input,
    check_strategy,
    distributed,
    find_callbacks,
    is_number,
)
from lightning_compress.callbacks.step_patch import TrainingStepPatch
from lightning_compress.core import distillation as core
from lightning_compress.core.surgery import add_param_group, drop_patch
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of

SELF = "self"  # teacher="self": distil from a copy of the model as it is when compression starts


class KnowledgeDistillation(CompressionCallback):
    """Distil a frozen teacher into the module being trained: response KD and, optionally, feature KD.

    Response KD (Hinton et al. 2015): ``KL(softmax(t/T) || softmax(s/T)) * T**2`` mixed with the
    loss your ``training_step`` returns as ``(1 - alpha) * task + alpha * KD``. Feature KD adds
    ``feature_weight`` times the mean distance between matched layers' outputs; where a student
    layer's output has another width than the teacher's, a learned adapter (1x1 conv or linear)
    bridges them. Adapters train with the first optimizer (a parameter group added when they are
    built, same hyper-parameters as group 0), live in this callback's checkpoint state, never in
    the model, so nothing of them is exported.

    Defaults that find what the callback needs, with the argument that overrides each:

    * the teacher's input is the first element of a tuple/list batch, the ``"input"`` key of a
      dict batch, or the batch tensor (``input_fn(batch)``);
    * the student's logits are the output of the module's first call in ``training_step``
      (``self(x)``) — a tensor, or the ``logits`` key/attribute, or the first element of a tuple
      (``logits_fn(output)``; ``logits_module`` names a submodule to read instead, for a step that
      calls ``self.net(x)``); the teacher's logits by the same rule from its output
      (``teacher_logits_fn``).

    The teacher is frozen (eval mode, no gradients, run under ``no_grad``), moved to the student's
    device and dtype when fit starts, kept on this callback (so it is never in the optimizer, in
    DDP's gradient sync or in the model's checkpoint; ``save_teacher=True`` puts its weights in the
    callback state).

    Logged every epoch (means over its steps): ``kd/loss`` (what the optimizer minimised),
    ``kd/task_loss`` (what ``training_step`` returned), ``kd/response_loss`` and, with
    ``features``, ``kd/feature_loss``.

    ``teacher="self"`` distils the compressed model from itself as it was before compression: a frozen copy
    (dense, float: masks folded, fake quantisation left out) of the module that produces the logits (the
    LightningModule, or ``logits_module``) taken just before the first compression callback of the Trainer first
    changes the model (a pruning mask update, QAT switched on, layers factorised), whatever the callbacks'
    order; until then the step trains on the task loss alone. Feature names on the teacher side are the same
    model's. The copy is never exported and is checkpointed only with ``save_teacher=True`` (a run resumed after
    the copy was taken needs it: the checkpoint's model is already compressed). Taken before the first training
    step (compression from step 0), it teaches only what the model already knew: a warning says so.

    Args:
        teacher: an ``nn.Module`` / ``LightningModule``, the path of a checkpoint, or ``"self"`` (above): a
            checkpoint of this package's ``ClassificationModule`` (a Lightning checkpoint or
            ``CompressionExport``'s ``model.ckpt``, compressed or not) loads as is; otherwise give
            ``teacher_class`` (a ``LightningModule`` class for a Lightning checkpoint, or an
            ``nn.Module`` class built without arguments for a plain state-dict file).
        temperature: softmax temperature ``T`` (> 0).
        alpha: weight of the KD term, in ``[0, 1]``.
        features: ``{"student.layer": "teacher.layer"}`` pairs for feature KD.
        feature_loss: ``mse``, ``cosine`` (both through an adapter where widths differ), ``rkd`` (relational KD,
            Park et al. 2019: distances and angles within the batch) or ``attention`` (attention transfer,
            Zagoruyko & Komodakis 2017: spatial maps of conv features); the last two need no adapter.
        feature_weight: weight of the feature term (>= 0).
        input_fn: ``batch -> teacher input``.
        logits_fn: ``student output -> logits``.
        teacher_logits_fn: ``teacher output -> logits``; default the same rule as the student's.
        logits_module: name of the student submodule whose output holds the logits; default the
            LightningModule itself.
        teacher_class: the teacher's class when ``teacher`` is a path.
        save_teacher: also keep the teacher's weights in the callback's checkpoint state.
        state_key_suffix: tells two instances apart in a checkpoint.

    Raises:
        CompressionConfigError: an argument of the wrong type or out of range, or an unreadable
            teacher checkpoint (at construction); manual optimisation, a teacher that shares
            parameters with the student, or a named layer that does not exist (at setup);
            teacher and student logits of different shapes (at the first step).

    Example::

        teacher = ClassificationModule.load_from_checkpoint("wide.ckpt")
        kd = KnowledgeDistillation(teacher, temperature=4.0, alpha=0.9, features={"model.features": "model.features"})
        Trainer(max_epochs=10, callbacks=[kd]).fit(ClassificationModule("cnn_tiny"), datamodule)
    """

    kind = "distillation"

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike[str],
        temperature: float = 4.0,
        alpha: float = 0.9,
        features: Mapping[str, str] | None = None,
        feature_loss: Literal["mse", "cosine", "rkd", "attention"] = "mse",
        feature_weight: float = 1.0,
        input_fn: Callable[[Any], Tensor] | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
        teacher_logits_fn: Callable[[Any], Tensor] | None = None,
        logits_module: str | None = None,
        teacher_class: type[nn.Module] | None = None,
        save_teacher: bool = False,
        state_key_suffix: str = "",
    ) -> None:
        if not is_number(temperature) or not temperature > 0:
            raise config_error("temperature", "a number > 0", temperature)
        if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise config_error("alpha", "a number in [0, 1]", alpha)
        if features is not None and not (
            isinstance(features, Mapping) and all(isinstance(name, str) for pair in features.items() for name in pair)
        ):
            raise config_error("features", "a mapping of student layer names to teacher layer names, or None", features)
        if feature_loss not in core.FEATURE_LOSSES:
            hint = did_you_mean(str(feature_loss), core.FEATURE_LOSSES)
            raise config_error("feature_loss", one_of(core.FEATURE_LOSSES), feature_loss, hint)
        if not is_number(feature_weight) or feature_weight < 0:
            raise config_error("feature_weight", "a number >= 0", feature_weight)
        for name, fn in (("input_fn", input_fn), ("logits_fn", logits_fn), ("teacher_logits_fn", teacher_logits_fn)):
            if fn is not None and not callable(fn):
                raise config_error(name, "a callable or None", fn)
        if logits_module is not None and not isinstance(logits_module, str):
            raise config_error("logits_module", "a submodule name or None", logits_module)
        if not isinstance(save_teacher, bool):
            raise config_error("save_teacher", "True or False", save_teacher)
        self.from_self = isinstance(teacher, str) and teacher == SELF
        if self.from_self and teacher_class is not None:
            raise config_error("teacher_class", "None with teacher='self' (the teacher is a copy of the model)",
                               teacher_class)  # fmt: skip
        self.teacher: nn.Module | None = None
        if not self.from_self:
            self.teacher = teacher if isinstance(teacher, nn.Module) else load_teacher(teacher, teacher_class)
            core.freeze_teacher(self.teacher)
        self.copied_at: int | None = None  # teacher="self": the global step at which the copy was taken
        self._saved_teacher: dict[str, Any] | None = None  # its weights, from a checkpoint
        self._skeleton: nn.Module | None = None  # a dense copy to load them into (taken at setup)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.features = dict(features or {})
        self.feature_loss = feature_loss
        self.feature_weight = float(feature_weight)
        self.input_fn = input_fn
        self.logits_fn = logits_fn
        self.teacher_logits_fn = teacher_logits_fn
        self.logits_module = logits_module
        self.save_teacher = save_teacher
        self._state_key_suffix = state_key_suffix
        # Run state: adapters (and their shapes) are what a checkpoint keeps.
        self.adapters: dict[str, nn.Module] = {}
        self._shapes: dict[str, tuple[list[int], list[int]]] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedulers: list[Any] = []
        self._student_layers: dict[str, nn.Module] = {}
        self._teacher_layers: dict[str, nn.Module] = {}
        self._output: nn.Module | None = None
        self._patch = TrainingStepPatch(self._training_step)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self._state_key_suffix)

    # -- set-up: check the pair early, wrap the training step for the length of the fit -----------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._patch.exit(pl_module)
        drop_patch(pl_module, "training_step")  # an interrupted fit may have left a wrapper behind
        if stage != "fit":
            return
        if len(find_callbacks(trainer, KnowledgeDistillation)) > 1:
            raise CompressionConfigError(
                "only one KnowledgeDistillation callback can train a module. HINT: for several teachers, pass one "
                "nn.Module that runs them all and returns their averaged logits"
            )
        if not pl_module.automatic_optimization:
            raise CompressionConfigError(
                f"KnowledgeDistillation needs automatic optimization, but {type(pl_module).__name__} sets "
                "`automatic_optimization = False`: its training_step steps the optimizer itself, so the callback "
                "cannot add the KD loss. HINT: call lightning_compress.core.distillation.response_kd_loss in your step"
            )
        student_params = {id(p) for p in pl_module.parameters()}
        if self.teacher is not None and any(id(p) in student_params for p in self.teacher.parameters()):
            raise CompressionConfigError(
                "KnowledgeDistillation's `teacher` shares parameters with the student being trained: freezing it "
                "would freeze the student. HINT: pass a separate copy (copy.deepcopy) or a checkpoint path"
            )
        self._find_layers(pl_module)
        if self.from_self:  # a new copy for this fit (a resumed one gets its own back from the checkpoint)
            assert self._output is not None
            self.teacher, self.copied_at, self._saved_teacher = None, None, None
            for name in self.features.values():
                core.resolve_module(self._output, name, "teacher")  # the copy has the model's names: check now
            self._skeleton = _frozen_copy(self._output)  # dense: for a resumed fit's saved copy (dropped once copied)
        else:
            self._find_teacher_layers()
        self.adapters, self._shapes = {}, {}  # a resumed run rebuilds them in load_state_dict, next
        self._optimizer, self._schedulers = None, []
        self._patch.enter(pl_module)  # until teardown or an exception

    def _find_layers(self, pl_module: pl.LightningModule) -> None:
        self._student_layers = {name: core.resolve_module(pl_module, name, "student") for name in self.features}
        self._output = pl_module
        if self.logits_module is not None:
            self._output = core.resolve_module(pl_module, self.logits_module, "student")

    @override
    def on_modules_replaced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, replaced: dict[str, tuple[nn.Module, nn.Module]]
    ) -> None:
        """Modules of the student were replaced: find the named layers again (adapters stay). With
        ``teacher="self"``, a replacement made while the fit sets up (QAT's attention projections), before any
        checkpoint is restored and before the copy, is one the copy will have: the dense skeleton is taken again."""
        self._find_layers(pl_module)
        if self._skeleton is not None and self.teacher is None and trainer.ckpt_path is None:
            self._skeleton = _frozen_copy(pl_module if self._output is None else self._output)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        floats = [p for p in pl_module.parameters() if p.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()
        if self.from_self:
            self._restore_self_teacher()
            changing = [c for c in find_callbacks(trainer, CompressionCallback) if c.changes_model]
            if self.copied_at is None and not changing:  # nothing will compress: the model as the fit starts
                self._take_copy(trainer, None)
        if self.teacher is not None:
            self.teacher.to(device=pl_module.device, dtype=dtype)
            core.freeze_teacher(self.teacher)
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None
        configs = trainer.lr_scheduler_configs
        self._schedulers = [c.scheduler for c in configs if c.scheduler.optimizer is self._optimizer]
        if self.adapters:  # restored from a checkpoint: train them on, before the optimizer state loads
            for adapter in self.adapters.values():
                adapter.to(device=pl_module.device, dtype=dtype)
            self._add_to_optimizer(list(self.adapters.values()))

    # -- teacher="self": the copy ---------------------------------------------------------------------
    @override
    def on_before_model_change(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, by: CompressionCallback
    ) -> None:
        if self.from_self and self.teacher is None and self.copied_at is None:
            self._take_copy(trainer, by)

    def _take_copy(self, trainer: pl.Trainer, by: CompressionCallback | None) -> None:
        assert self._output is not None  # set at setup
        self.teacher = _frozen_copy(self._output)
        self._find_teacher_layers()
        self.copied_at = trainer.global_step
        self._skeleton = None
        what = f"before {type(by).__name__} changes it" if by is not None else "as the fit starts (nothing compresses)"
        rank_zero_info(
            f"KnowledgeDistillation: teacher='self' is a frozen dense float copy of the model at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}), {what}"
        )
        if trainer.global_step == 0:
            rank_zero_warn(
                "KnowledgeDistillation(teacher='self') copied the model before its first training step: the copy "
                "teaches only what the model already knows (pretrained or loaded weights). HINT: from random "
                "weights, start the compression callbacks after a warm-up (start_epoch=..., LowRankFactorization's "
                "epoch=...)"
            )

    def _find_teacher_layers(self) -> None:
        assert self.teacher is not None
        self._teacher_layers = {n: core.resolve_module(self.teacher, t, "teacher") for n, t in self.features.items()}

    def _restore_self_teacher(self) -> None:
        """A resumed fit: the copy comes back from the checkpoint, or the fit cannot go on."""
        if self.copied_at is None or self.teacher is not None:
            return
        if self._saved_teacher is None or self._skeleton is None:
            raise CompressionConfigError(
                f"KnowledgeDistillation(teacher='self') took its copy of the model at step {self.copied_at}, and "
                "this checkpoint does not hold it: the model in the checkpoint has changed since (compressed, or "
                "trained on), so the copy cannot be taken again. HINT: KnowledgeDistillation(teacher='self', "
                "save_teacher=True) keeps the copy in the checkpoints of a run that is to be resumed"
            )
        self._skeleton.load_state_dict(self._saved_teacher)
        self.teacher, self._skeleton, self._saved_teacher = core.freeze_teacher(self._skeleton), None, None
        self._find_teacher_layers()

    # -- the distillation step --------------------------------------------------------------------
    def _training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        if self.teacher is None:  # teacher="self" before compression starts: the task alone
            return original(*args, **kwargs)
        batch = args[0] if args else kwargs.get("batch")
        assert self._output is not None  # set at setup
        with core.capture({"": self._output, **self._student_layers}) as seen:
            result = original(*args, **kwargs)
        if result is None:  # the step skipped this batch
            return None
        task = result.get("loss") if isinstance(result, Mapping) else result
        if not isinstance(task, Tensor):
            raise CompressionConfigError(
                f"KnowledgeDistillation mixes its loss with what training_step returns, which must be the loss "
                f"tensor or a dict with a 'loss' key, got {type(result).__name__}"
            )
        if "" not in seen:
            where = self.logits_module or type(pl_module).__name__
            raise CompressionConfigError(
                f"KnowledgeDistillation did not see the student's logits: training_step never called {where!r}. "
                "HINT: call the module as self(x), or name the submodule that produces the logits with "
                "`logits_module` (e.g. logits_module='net')"
            )
        student_logits = self.logits_fn(seen[""]) if self.logits_fn else core.logits_of(seen[""], "student")
        x = self.input_fn(batch) if self.input_fn else batch_input(batch)
        with torch.no_grad(), core.capture(self._teacher_layers) as taught:
            answer = self.teacher(x)
        teacher_logits = self.teacher_logits_fn(answer) if self.teacher_logits_fn else core.logits_of(answer, "teacher")
        kd = core.response_kd_loss(student_logits, teacher_logits, self.temperature)
        total = (1 - self.alpha) * task + self.alpha * kd
        size = len(student_logits)
        figures = {"kd/task_loss": task.detach(), "kd/response_loss": kd.detach()}
        if self.features:
            features = self._feature_loss(seen, taught)
            total = total + self.feature_weight * features
            figures["kd/feature_loss"] = features.detach()
        figures["kd/loss"] = total.detach()
        pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=size)  # epoch means, as `kd/*`
        return {**result, "loss": total} if isinstance(result, Mapping) else total

    def _feature_loss(self, seen: dict[str, Any], taught: dict[str, Any]) -> Tensor:
        losses = []
        for name, teacher_name in self.features.items():
            student, teacher = seen.get(name), taught.get(name)
            for role, layer, value in (("student", name, student), ("teacher", teacher_name, teacher)):
                if not isinstance(value, Tensor):
                    raise CompressionConfigError(
                        f"KnowledgeDistillation feature pair {name!r} -> {teacher_name!r}: the {role} layer {layer!r} "
                        f"returned {type(value).__name__} in this step, not a tensor. HINT: name a layer that runs "
                        "in forward and returns one tensor"
                    )
            assert isinstance(student, Tensor) and isinstance(teacher, Tensor)
            if self.feature_loss in core.SHAPE_FREE_LOSSES:  # relations / attention maps: no adapter to learn
                losses.append(core.feature_loss(student, teacher, self.feature_loss))
                continue
            adapter = self.adapters.get(name)
            if adapter is None:
                try:
                    adapter = self._build_adapter(name, student, teacher)
                except CompressionConfigError as error:
                    raise CompressionConfigError(f"feature pair {name!r} -> {teacher_name!r}: {error}") from None
            losses.append(core.feature_loss(adapter(student), teacher, self.feature_loss))
        return torch.stack(losses).mean()

    def _build_adapter(self, name: str, student: Tensor, teacher: Tensor) -> nn.Module:
        adapter = core.make_adapter(student.shape, teacher.shape).to(device=student.device, dtype=student.dtype)
        if distributed():  # every rank starts from rank zero's initialisation
            for tensor in adapter.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.adapters[name] = adapter
        self._shapes[name] = (list(student.shape), list(teacher.shape))
        if any(True for _ in adapter.parameters()):
            self._add_to_optimizer([adapter])
            rank_zero_info(f"KnowledgeDistillation: adapter {name}: {tuple(student.shape)} -> {tuple(teacher.shape)}")
        return adapter

    def _add_to_optimizer(self, adapters: list[nn.Module]) -> None:
        params = [p for adapter in adapters for p in adapter.parameters()]
        if params and self._optimizer is not None:
            add_param_group(self._optimizer, params, self._schedulers)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not distributed() or optimizer is not self._optimizer:
            return
        world = dist.get_world_size()
        for adapter in self.adapters.values():  # outside DDP's module: average their gradients here
            for param in adapter.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= world

    # -- end of fit and checkpoint state ---------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.from_self and self.teacher is None:
            rank_zero_info(
                "KnowledgeDistillation(teacher='self') distilled nothing: no compression callback changed the model "
                "in this fit, so no copy was taken"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._patch.exit(pl_module)
        self._optimizer, self._schedulers = None, []
        self._student_layers, self._output = {}, None  # no reference to the model outlives the fit
        self._skeleton = self._saved_teacher = None  # the copy itself stays, as a given teacher does (setup drops it)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kind": self.kind,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "adapters": {
                name: {"student_shape": s, "teacher_shape": t, "state": self.adapters[name].state_dict()}
                for name, (s, t) in self._shapes.items()
            },
        }
        if self.from_self:
            state["self_copied_at"] = self.copied_at
        if self.save_teacher and self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adapters, self._shapes = {}, {}
        for name, saved in state_dict.get("adapters", {}).items():
            shapes = (list(saved["student_shape"]), list(saved["teacher_shape"]))
            adapter = core.make_adapter(torch.Size(shapes[0]), torch.Size(shapes[1]))
            adapter.load_state_dict(saved["state"])
            self.adapters[name], self._shapes[name] = adapter, shapes
        if self.from_self:
            self.copied_at = state_dict.get("self_copied_at")
            self._saved_teacher = state_dict.get("teacher")
        elif "teacher" in state_dict and self.teacher is not None:
            self.teacher.load_state_dict(state_dict["teacher"])


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen dense float copy of ``module`` (:func:`float_copy`) without the load hooks other callbacks put on
    the model (low-rank's rebuild before loading would act on the live Trainer): a teacher, not a student."""
    copied = float_copy(module)
    for part in copied.modules():
        part._load_state_dict_pre_hooks.clear()
        part._load_state_dict_post_hooks.clear()
    return core.freeze_teacher(copied)


def load_teacher(path: str | os.PathLike[str], teacher_class: type[nn.Module] | None = None) -> nn.Module:
    """Load a teacher from a checkpoint file.

    Args:
        path: a Lightning checkpoint, or a plain state-dict file for an ``nn.Module`` class.
        teacher_class: ``None`` for a checkpoint of this package's ``ClassificationModule``; a
            ``LightningModule`` class (``load_from_checkpoint``); or an ``nn.Module`` class built
            with no arguments that loads the file as its state dict.

    Raises:
        CompressionConfigError: no such file, a class of the wrong kind, or a file that does not load.
    """
    if teacher_class is not None and not (isinstance(teacher_class, type) and issubclass(teacher_class, nn.Module)):
        raise config_error("teacher_class", "an nn.Module or LightningModule class, or None", teacher_class)
    if not isinstance(path, (str, os.PathLike)):
        raise config_error("teacher", "an nn.Module, a LightningModule or the path of a checkpoint file", path)
    file = Path(path)
    if not file.is_file():
        raise config_error("teacher", "an nn.Module, a LightningModule or the path of a checkpoint file", str(path),
                           "no such file")  # fmt: skip
    try:
        if teacher_class is not None and issubclass(teacher_class, pl.LightningModule):
            return teacher_class.load_from_checkpoint(file, map_location="cpu", weights_only=True)
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        if teacher_class is not None:
            model = teacher_class()
            state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
            model.load_state_dict(state)
            return model
        from lightning_compress.vision.module import ClassificationModule

        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if not isinstance(hparams.get("model"), str):
            raise CompressionConfigError(
                f"the teacher checkpoint {str(path)!r} was not written by lightning_compress's ClassificationModule "
                "with a named model. HINT: pass `teacher_class` (your LightningModule or nn.Module class)"
            )
        from lightning_compress.deploy.restore import restore  # a compressed teacher is rebuilt as trained

        return restore(ClassificationModule(**hparams), checkpoint)
    except CompressionConfigError:
        raise
    except Exception as error:  # torch.load and load_state_dict raise many kinds: name the file and the cause
        raise CompressionConfigError(
            f"cannot read the teacher checkpoint {str(path)!r}: {type(error).__name__}: {str(error)[:300]}"
        ) from error
