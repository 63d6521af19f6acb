"""The one interface every meta-learning algorithm implements, and the vectorised machinery they share.

An algorithm is a small object holding only static structure (the model skeleton, learning rates,
step counts); all state lives in a flat parameter dict ``Params``. Its methods are pure functions:

* ``adapt(params, support_x, support_y, steps) -> state``   one task's adapted state (a dict)
* ``predict(params, state, query_x) -> outputs``            ``[Q, ways]`` logits or ``[Q, 1]`` values
* ``meta_gradient(params, batch) -> ShardResult``           the call that crosses the Ray boundary:
  the *sum* over the batch's tasks of each task's meta-gradient, the task count and metric sums.
* ``evaluate(params, batch, steps) -> {metric: [T]}``       adapt on support, score on query.

``meta_gradient(params, batch, per_class=True)`` (classification) also returns each task's per-class query accuracy
and mean true-class probability (``ShardResult.per_class``, ``[T, N]``, :func:`class_metrics`), from the same
vmapped query logits the meta-gradient differentiates; :func:`rank_classes` orders each task's classes worst first
(what ``optim.hard_tasks`` needs: its failure class, Sun et al. 2019 Sec. 4.2).

Normalisation (``norm``, docs/architecture.md "Normalisation"): with ``"support"`` (the default) every
forward pass over query examples carries the task's support set in front of them and normalises with
the support rows' statistics only (:meth:`FunctionalAlgorithm.forward`), so ``adapt`` keeps the support
inputs in its state under :data:`SUPPORT_X` and a query's output is a function of the support set and
that query alone: the same alone, in any subset or order. ``"transductive"`` normalises every batch
with its own statistics.

Per-task work is vectorised with ``torch.func.vmap`` over tasks, in chunks of ``chunk_size`` tasks
(0: as many as a memory budget holds, see :func:`chunks` and :attr:`FunctionalAlgorithm.chunk_limit`) so
memory stays bounded; there is no Python loop over tasks or deep-copied models.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl_ray.config import NORM_SUPPORT, NORMS, AlgorithmConfig
from mtl_ray.data.base import TaskBatch, TaskKind

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]  # per-task (or, vmapped, ``[T]``) metric values by key (LOSS, ACC)
# ``(params, fixed, support_x, support_y, query_x, query_y) -> (summed meta-gradient, metrics)`` for one chunk
ChunkGrad = Callable[..., tuple[Params, Metrics]]

EXTRA_PREFIX = "meta."  # non-model meta-parameters, e.g. Meta-SGD's learned inner rates
# The state entry holding the support inputs ``[S, *x_shape]`` whose statistics normalise queries (norm="support").
SUPPORT_X = "norm.support_x"

# algorithm.task_chunk_size=0 (auto) without a memory budget (an algorithm used directly, not by a ShardWorker, which
# sizes chunks from mtl_ray.memory's per-task estimate: chunk_limit): on CPU at most this many input elements per vmap
# call, because a chunk's activations (and their second-order graph) scale with it: bounded chunks keep a meta-batch's
# peak memory down at the same or better speed (docs/benchmarks.md, "The main job: glibc's heap and task chunks").
# Other devices take the whole shard.
AUTO_CHUNK_ELEMENTS = 1 << 19
# ``(training, inner steps) -> most tasks per vmap call`` (0: no limit): the memory budget's automatic chunk size
ChunkLimit = Callable[[bool, int], int]

# algorithm.compile's check, against a float64 eager meta-gradient: the compiled one may be at most COMPILE_RTOL
# (relative, per tensor) from it, or COMPILE_SLACK times as far as the float32 eager one when that is further: with
# several inner steps eager float32 itself is ~5e-3 from float64 for second-order Conv4 (docs/benchmarks.md).
COMPILE_RTOL = 1e-3
COMPILE_SLACK = 2.0
# ... plus this share of the whole gradient's norm: some meta-gradients are exactly 0 in exact arithmetic (a conv
# bias in front of batch-statistics norm), so theirs is rounding noise that no relative bound fits.
COMPILE_FLOOR = 1e-2


class CompileMismatchError(RuntimeError):
    pass


# Metric keys inside a ShardResult / evaluate() result: sums over tasks (divide by num_tasks).
LOSS = "loss"
ACC = "acc"
# Per-class keys (``meta_gradient(..., per_class=True)``, ``ShardResult.per_class``): ``[T, N]``, one row per task
CLASS_ACC = "class_acc"  # share of the class's query examples predicted as that class (argmax of the outputs)
CLASS_PROB = "class_prob"  # mean softmax probability of the true class over the class's query examples
PER_CLASS = (CLASS_ACC, CLASS_PROB)


@dataclass(frozen=True)
class ShardResult:
    """What a worker returns for its shard of a meta-batch."""

    grads: Params  # sum over the shard's tasks of each task's meta-gradient
    num_tasks: int
    metrics: dict[str, float] = field(default_factory=dict)  # sums over tasks
    seconds: float = 0.0  # wall time the worker spent sampling and computing this shard
    # meta_gradient(..., per_class=True): {CLASS_ACC, CLASS_PROB: [T, N]} of the batch's tasks, in batch order
    per_class: dict[str, torch.Tensor] = field(default_factory=dict)
    # optim.hard_tasks: task index -> its classes (global ids) ranked worst query accuracy first, set by the worker
    # from per_class (which it drops); empty otherwise
    failures: dict[int, tuple[int, ...]] = field(default_factory=dict)


class MetaAlgorithm(Protocol):
    name: str
    kind: TaskKind

    def init_params(self, model_params: Params) -> Params: ...

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> State: ...

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor: ...

    def meta_gradient(self, params: Params, batch: TaskBatch, per_class: bool = False) -> ShardResult: ...

    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]: ...




def task_loss_fn(kind: TaskKind) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on logits ``[Q, N]`` vs labels ``[Q]``; MSE on ``[Q, 1]`` vs ``[Q, 1]``."""
    return F.cross_entropy if kind == "classification" else F.mse_loss


def task_metrics(kind: TaskKind, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    metrics = {LOSS: loss.detach()}
    if kind == "classification":
        metrics[ACC] = (out.detach().argmax(-1) == y).to(out.dtype).mean()
    return metrics


def class_metrics(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class query scores of one task: outputs ``out [Q, N]`` (logits, or any per-class scores whose argmax is the
    prediction) against labels ``y [Q]`` -> ``{CLASS_ACC: [N], CLASS_PROB: [N]}``.

    ``CLASS_ACC[n]``: the share of class ``n``'s queries whose argmax is ``n``; ``CLASS_PROB[n]``: the mean over them of
    ``softmax(out)[y]`` (the tie-break of :func:`rank_classes`). A class without queries scores 0 on both. Detached,
    in at least float32 (bf16 autocast outputs are promoted); vmap-safe (comparisons, no indexing by data).
    """
    out = out.detach()
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    onehot = (y.unsqueeze(-1) == torch.arange(out.shape[-1], device=y.device)).to(out.dtype)  # [Q, N]
    count = onehot.sum(0).clamp_min(1.0)
    correct = (out.argmax(-1) == y).to(out.dtype)  # [Q]
    p_true = (out.softmax(-1) * onehot).sum(-1)  # [Q]
    return {CLASS_ACC: (onehot * correct.unsqueeze(-1)).sum(0) / count,
            CLASS_PROB: (onehot * p_true.unsqueeze(-1)).sum(0) / count}


def rank_classes(class_acc: torch.Tensor, class_prob: torch.Tensor) -> torch.Tensor:
    """Each task's labels ordered worst first: ``[T, N]`` accuracies and probabilities -> ``[T, N]`` int64 labels.

    Lowest query accuracy first; equal accuracies by lowest mean true-class probability; equal both by lowest label
    (stable sorts, vectorised over tasks). Column 0 is each task's failure class (Sun et al. 2019 Sec. 4.2).
    """
    by_prob = torch.sort(class_prob, dim=-1, stable=True).indices  # ties: lower label first
    by_acc = torch.sort(class_acc.gather(-1, by_prob), dim=-1, stable=True).indices
    return by_prob.gather(-1, by_acc)


def compile_difference(got: Params, want: Params) -> tuple[float, str]:
    """Worst per-tensor ``|got - want| / (|want| + COMPILE_FLOOR * |whole want|)`` (norms) and its key."""
    # Python floats are IEEE doubles: the same float64 additions, in the same order, as summing the 0-d tensors.
    floor = COMPILE_FLOOR * math.sqrt(sum(float(v.double().square().sum()) for v in want.values()))
    errs = {k: float((got[k] - want[k]).norm()) / (float(want[k].norm()) + floor + 1e-30) for k in want}
    worst = max(errs, key=errs.__getitem__)
    return errs[worst], worst


def tasks_within(budget_bytes: int, task_bytes: int) -> int:
    """Tasks whose chunk tensors (``task_bytes`` each) fit ``budget_bytes``: at least one."""
    return max(1, int(budget_bytes) // max(int(task_bytes), 1))


def chunks(batch: TaskBatch, chunk_size: int, max_tasks: int = 0) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of the batch's tasks, one per ``vmap`` call: ``chunk_size`` tasks each.

    ``chunk_size = 0`` (auto): the fewest near-equal chunks of at most ``max_tasks`` tasks each (what a memory
    budget holds, :func:`tasks_within`); without one (``max_tasks = 0``), on CPU the fewest near-equal chunks
    whose inputs (support + query) hold at most :data:`AUTO_CHUNK_ELEMENTS` elements each (at least one task
    per chunk), elsewhere the whole batch.
    """
    n = batch.num_tasks
    if chunk_size > 0:
        return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    if not n:
        return []
    parts = 1
    if max_tasks > 0:
        parts = math.ceil(n / max_tasks)
    elif batch.support_x.device.type == "cpu":
        per_task = (batch.support_x.numel() + batch.query_x.numel()) // n
        parts = math.ceil(n / max(1, AUTO_CHUNK_ELEMENTS // max(per_task, 1)))
    return list(itertools.pairwise(i * n // parts for i in range(parts + 1)))  # sizes differ by at most one


def add_into(total: Params | None, part: Mapping[str, torch.Tensor]) -> Params:
    if total is None:
        return {k: v.clone() for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total


def split_per_class(metrics: Metrics) -> tuple[Metrics, Metrics]:
    """``(the per-task metrics, the per-class ones)`` of a vmapped chunk's metrics (:data:`PER_CLASS` keys)."""
    return ({k: v for k, v in metrics.items() if k not in PER_CLASS},
            {k: v.detach() for k, v in metrics.items() if k in PER_CLASS})


def cat_rows(rows: Sequence[Metrics]) -> dict[str, torch.Tensor]:
    """Chunks' per-class metrics ``[t_c, N]`` -> ``[T, N]`` on the CPU, in chunk order (empty without any)."""
    if not rows or not rows[0]:
        return {}
    return {k: torch.cat([r[k] for r in rows]).cpu() for k in rows[0]}


def _accumulate(sums: dict[str, float], metrics: Mapping[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v.sum())


class FunctionalAlgorithm:
    """Shared machinery: model application, losses and the chunked ``vmap(grad(task_loss))``.

    Subclasses define ``adapt`` and ``predict``; the per-task meta-objective is
    ``loss(predict(params, adapt(params, support), query_x), query_y)`` for all of them
    (Reptile overrides :meth:`meta_gradient`).
    """

    name: ClassVar[str] = "base"  # its algorithm.name (the key in mtl_ray.algorithms.registry.ALGORITHMS)

    # Capabilities: what the config checks (mtl_ray.components), the learner builder and the tests read.
    uses_head: ClassVar[bool] = True  # its model needs a ``ways``-output head (metric learners have none)
    has_inner_loop: ClassVar[bool] = True  # adapts with inner gradient steps (False: algorithm.inner_steps may be 0)
    second_order: ClassVar[bool] = True  # can differentiate through its inner loop (False: always first-order)
    supports_regression: ClassVar[bool] = True  # works on regression tasks (data sources of kind "regression")
    accepts_init: ClassVar[bool] = True  # may start from a pretrained body (model.init)
    needs_init: ClassVar[bool] = False  # must start from one: model.init may not be empty
    compilable: ClassVar[bool] = True  # computes a meta-gradient that algorithm.compile can compile
    outer_backward: ClassVar[bool] = True  # its meta-gradient differentiates through each task (what a chunk holds)
    # The model class it builds instead of the model.name one (from that one's settings), and the model.name
    # values whose settings it reads; None / () when it uses the model.name model as it is.
    model_class: ClassVar[type | None] = None
    model_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, *, kind: TaskKind, inner_lr: float = 0.0, inner_steps: int = 0,
                 first_order: bool = False, chunk_size: int = 0, compile: bool = False, norm: str = NORM_SUPPORT,
                 ways: int = 0):
        if norm not in NORMS:
            raise ValueError(f"norm: got {norm!r}, expected one of {', '.join(NORMS)}")
        self.model = model
        self.norm = norm
        # Only models with batch norm need the support set in front of their queries (the MLP has none), and only
        # theirs are batch-dependent under "transductive".
        normalises = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
        self.support_normalised = norm == NORM_SUPPORT and normalises
        self.transductive = norm != NORM_SUPPORT and normalises  # a query's output depends on the others
        self.kind: TaskKind = kind
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order) or not self.second_order
        self.ways = int(ways)  # the classes of a task (metric learners build one score per class)
        self.chunk_size = int(chunk_size)
        # chunk_size 0: the most tasks per vmap call a memory budget holds, set by whoever knows the machine (the
        # ShardWorker, from mtl_ray.memory); None: chunks() sizes them from the input elements
        self.chunk_limit: ChunkLimit | None = None
        self.compile = bool(compile)
        # per_class flag -> (eager, compiled or None) chunk meta-gradient: built on first use
        self._grad_fns: dict[bool, tuple[ChunkGrad, ChunkGrad | None]] = {}
        self._verified: set[tuple] = set()  # input shapes whose compiled meta-gradient matched the eager one

    @classmethod
    def config_kwargs(cls, a: AlgorithmConfig) -> dict[str, Any]:
        """Its own constructor arguments from ``algorithm.*`` besides the shared ones (e.g. the starting values of
        meta-parameters it learns); none by default."""
        return {}

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-task loss of outputs ``out`` against targets ``y`` (mean over query examples)."""
        return task_loss_fn(self.kind)(out, y)

    # ---------------------------------------------------------------- model application
    def model_params(self, params: Params) -> Params:
        """The entries of ``params`` that belong to the model (drops learned inner rates etc.)."""
        return {k: v for k, v in params.items() if not k.startswith(EXTRA_PREFIX)}

    def body_weights(self, params: Params) -> Params:
        """The body's weights, ``body.`` prefix removed, as this algorithm's features use them (what test-time
        fine-tuning, mtl_ray/algorithms/finetune.py, starts from); MTL's are scaled and shifted."""
        return {k[len("body."):]: v for k, v in params.items() if k.startswith("body.")}

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The whole model on ``x`` alone: batch statistics from ``x`` (the support set itself, in ``adapt``)."""
        return functional_call(self.model, params, (x,))

    def keep_support(self, state: State, support_x: torch.Tensor) -> State:
        """``adapt``'s result: ``state`` plus the support inputs when they normalise the queries."""
        return {**state, SUPPORT_X: support_x} if self.support_normalised else state

    @staticmethod
    def weights(state: State) -> Params:
        """An adapted state's weights, without the support inputs it may carry."""
        return {k: v for k, v in state.items() if k != SUPPORT_X}

    def forward(self, module: nn.Module, weights: Params, x: torch.Tensor, state: State) -> torch.Tensor:
        """``module`` on query inputs ``x [Q, ...]`` -> ``[Q, ...]``, normalised as ``self.norm`` says.

        With the support inputs in ``state`` (norm="support") they run in front of ``x`` in the same call
        and alone give the statistics (``ref``): output ``i`` depends on the support set and ``x[i]`` only.
        Otherwise ``x`` is normalised with its own statistics (transductive).
        """
        support = state.get(SUPPORT_X)
        if support is None:
            return functional_call(module, weights, (x,))
        n = support.shape[0]
        return functional_call(module, weights, (torch.cat([support, x]),), self.norm_kwargs(n))[n:]

    def norm_kwargs(self, ref: int) -> dict[str, int | bool]:
        """The forward-pass arguments that normalise with the first ``ref`` rows' statistics.

        First-order learners take those statistics as constants: their meta-gradient drops the terms through
        the support set (the inner loop's), and keeping the one through the support statistics alone stopped
        first-order MAML from learning (docs/architecture.md, "Normalisation").
        """
        return {"ref": ref, "ref_grad": not self.first_order}

    def init_params(self, model_params: Params) -> Params:
        return dict(model_params)

    def chunks(self, batch: TaskBatch, training: bool, steps: int) -> list[tuple[int, int]]:
        """The ``vmap`` calls for ``batch`` (:func:`chunks`): ``chunk_size`` tasks, or what :attr:`chunk_limit`
        allows for a meta-gradient (``training``) or an evaluation with ``steps`` inner steps."""
        limit = self.chunk_limit(training, steps) if self.chunk_size <= 0 and self.chunk_limit is not None else 0
        return chunks(batch, self.chunk_size, limit)

    def is_frozen(self, key: str) -> bool:
        """Whether meta-parameter ``key`` is held fixed (no meta-gradient, never updated); none by default."""
        return False

    # ---------------------------------------------------------------- per-task pure functions
    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> State:
        raise NotImplementedError

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def task_objective(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                       qy: torch.Tensor, steps: int, per_class: bool = False) -> tuple[torch.Tensor, Metrics]:
        out = self.predict(params, self.adapt(params, sx, sy, steps), qx)
        loss = self.loss(out, qy)
        return loss, self.query_metrics(out, qy, loss, per_class)

    def query_metrics(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor,
                      per_class: bool = False) -> Metrics:
        """One task's metrics on its queries; with ``per_class`` (classification) also :func:`class_metrics`."""
        metrics = task_metrics(self.kind, out, y, loss)
        if per_class and self.kind == "classification":
            metrics.update(class_metrics(out, y))
        return metrics

    # ---------------------------------------------------------------- batched entry points
    def _eager_chunk_grad(self, per_class: bool = False) -> ChunkGrad:
        """``(params, fixed, sx, sy, qx, qy) -> (d sum of task losses / d params, metrics)`` for one chunk (with
        ``per_class``, the metrics include :func:`class_metrics` ``[T, N]``: outputs only, the gradient is the same)."""
        steps = self.inner_steps

        def objective(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                      qy: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
            return self.task_objective(p, sx, sy, qx, qy, steps, per_class)

        per_task = vmap(objective, in_dims=(None, 0, 0, 0, 0))

        def chunk_loss(p: Params, fixed: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                       qy: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
            # d(sum of task losses)/d params is the sum of the per-task meta-gradients: one backward
            # through the vmapped tasks instead of per-task gradients that are then summed.
            losses, metrics = per_task({**fixed, **p}, sx, sy, qx, qy)
            return losses.sum(), metrics

        return grad(chunk_loss, has_aux=True)

    def chunk_grad(self, params: Params, fixed: Params, *task: torch.Tensor,
                   per_class: bool = False) -> tuple[Params, Metrics]:
        """One chunk's summed meta-gradient; with ``compile`` through ``torch.compile`` (TorchInductor).

        Compiling removes the per-op dispatch that dominates small models (the sinusoid MLP). It does not
        always compute the same numbers: for second-order Conv4 MAML in float32, torch 2.13's compiled
        meta-gradient was 1-2% (relative) off the eager one, while in float64 the two agree to 1e-14.
        So the first call for each input shape is checked against eager float64 (:meth:`_check_compiled`)
        and a compiled gradient less accurate than eager float32 is an error, never a silent update.
        """
        fns = self._grad_fns.get(per_class)
        if fns is None:
            eager_fn = self._eager_chunk_grad(per_class)
            fns = self._grad_fns[per_class] = (eager_fn, torch.compile(eager_fn, dynamic=False) if self.compile
                                               else None)
        eager, compiled = fns
        if compiled is None:
            return eager(params, fixed, *task)
        out = compiled(params, fixed, *task)
        key = tuple(tuple(t.shape) for t in task) + (("per_class",) if per_class else ())
        if key not in self._verified:
            self._check_compiled(eager, out[0], params, fixed, task, key)
            self._verified.add(key)
        return out

    def _check_compiled(self, eager: ChunkGrad, got: Params, params: Params, fixed: Params,
                        task: tuple[torch.Tensor, ...], key: tuple) -> None:
        """Raise :class:`CompileMismatchError` unless ``got`` is as close to float64 as the eager meta-gradient.

        The reference is the eager meta-gradient in float64 (once per task shape; it needs about twice the
        chunk's float32 memory). Comparing with eager float32 alone would refuse a compiled gradient that
        differs from it only as much as float32 rounding already moves either of them.
        """
        def f64(p: Params) -> Params:
            return {k: v.double() for k, v in p.items()}

        batch64 = TaskBatch(*task).to(task[0].device, torch.float64)  # labels stay integer
        ref = eager(f64(params), f64(fixed), batch64.support_x, batch64.support_y, batch64.query_x,
                    batch64.query_y)[0]
        eager_err, _ = compile_difference(f64(eager(params, fixed, *task)[0]), ref)
        err, worst = compile_difference(f64(got), ref)
        limit = max(COMPILE_RTOL, COMPILE_SLACK * eager_err)
        if not err <= limit:
            raise CompileMismatchError(
                f"algorithm.compile: the compiled meta-gradient of {self.name} on task shapes {key} is {err:.3g} "
                f"from the float64 eager one (relative, worst in {worst}), expected <= {limit:.3g} "
                f"(max of {COMPILE_RTOL:g} and {COMPILE_SLACK:g} x the float32 eager one's {eager_err:.3g}); "
                "torch.compile computes this model differently: set algorithm.compile=false")

    def meta_gradient(self, params: Params, batch: TaskBatch, per_class: bool = False) -> ShardResult:
        """Sum over tasks of ``d loss_query(adapt(params, support)) / d params`` (vectorised).

        Frozen entries (:meth:`is_frozen`) are inputs, not variables: they get no gradient. ``per_class``
        (classification): also each task's :func:`class_metrics` in ``ShardResult.per_class`` (``[T, N]``).
        """
        fixed = {k: v for k, v in params.items() if self.is_frozen(k)}
        params = {k: v for k, v in params.items() if k not in fixed}
        total: Params | None = None
        sums: dict[str, float] = {}
        rows: list[Metrics] = []
        for start, stop in self.chunks(batch, True, self.inner_steps):
            part = batch.slice(start, stop)
            if per_class:
                grads, metrics = self.chunk_grad(params, fixed, part.support_x, part.support_y, part.query_x,
                                                 part.query_y, per_class=True)
                metrics, per = split_per_class(metrics)
                rows.append(per)
            else:
                grads, metrics = self.chunk_grad(params, fixed, part.support_x, part.support_y, part.query_x,
                                                 part.query_y)
            total = add_into(total, grads)
            _accumulate(sums, metrics)
        assert total is not None, "meta_gradient needs at least one task"
        return ShardResult(grads=total, num_tasks=batch.num_tasks, metrics=sums, per_class=cat_rows(rows))

    def evaluate(self, params: Params, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
        """Per-task metrics ``{name: [T]}`` after adapting each task on its support set for ``steps`` steps."""
        params = {k: v.detach() for k, v in params.items()}

        def score(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> Metrics:
            return self.task_objective(p, sx, sy, qx, qy, steps)[1]

        per_task = vmap(score, in_dims=(None, 0, 0, 0, 0))
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():  # torch.func.grad inside adapt still works: it ignores an outer no_grad
            for start, stop in self.chunks(batch, False, steps):
                part = batch.slice(start, stop)
                parts.append(per_task(params, part.support_x, part.support_y, part.query_x, part.query_y))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
