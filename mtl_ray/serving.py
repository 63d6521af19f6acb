"""A trained meta-learner as an MLflow pyfunc model: few-shot adaptation as a service.

One request is one task: a labelled support set and the queries to label. The model adapts to the
support set and predicts, like :meth:`FewShotLearner.adapt(...).predict(...) <mtl_ray.api.FewShotLearner.adapt>`.

    with mlflow.start_run():
        info = log_fewshot_model("runs/omniglot_protonet/checkpoints/step_00002000.pt")
    model = mlflow.pyfunc.load_model(info.model_uri)
    labels = model.predict({"support_x": sx, "support_y": sy, "query_x": qx})

Input (``x_shape`` is the shape one example had in training: ``(C, H, W)`` for images, e.g. ``(1, 28, 28)`` for
Omniglot; ``(D,)`` for regression, ``(1,)`` for sinusoid):

  ``support_x``  float32 array ``[S, *x_shape]``: the support examples, preprocessed as in training
                 (images: float in 0..1, ink high; :meth:`FewShotLearner.load_images` makes them from files; the
                 run's channel normalisation, ``data.channel_mean``/``channel_std``, is applied by the model);
  ``support_y``  array ``[S]``: one label per support example. Classification: any labels (ints or strings;
                 an object array keeps their types); regression: float targets;
  ``query_x``    float32 array ``[Q, *x_shape]``: the examples to label.

Output: an array ``[Q]``, the predicted support label of each query (classification) or the predicted value
(regression). A query's answer depends on the support set and that query only, never on the other queries of
the request. A model trained with ``model.norm=transductive`` (whose answers do depend on them) answers only a
request that says so: ``params={"transductive": True}`` (JSON: ``"params": {"transductive": true}``); without
it the request fails with HTTP 400 and says why.

Through ``mlflow.pyfunc`` the input is a dict of numpy arrays; the signature is tensor-based, so MLflow checks the
names, shapes and float32 dtype before the model runs. ``mlflow models serve`` takes the same dict as JSON in the
"inputs" format, nested lists, cast to the signature's dtypes by the scoring server::

    {"inputs": {"support_x": [[[[0.0, ...]]], ...], "support_y": ["a", "b", ...], "query_x": [...]}}

A direct call of :meth:`FewShotModel.predict` also takes a one-row pandas DataFrame with those three columns, each
cell holding a whole array. Bad input raises :class:`ServingInputError` (a :class:`UserError`, and an
``MlflowException`` so the scoring server answers HTTP 400 with its message).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED
from mlflow.pyfunc.model import PythonModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import mtl_ray
from mtl_ray.algorithms import TaskShape
from mtl_ray.api import FewShotLearner
from mtl_ray.checkpoint import latest_checkpoint, load_checkpoint
from mtl_ray.config import NORM_TRANSDUCTIVE, UserError
from mtl_ray.memory import fmt_bytes

__all__ = ["INPUT_KEYS", "FewShotModel", "ServingInputError", "default_pip_requirements", "fewshot_signature",
           "log_fewshot_model", "serve_command"]

INPUT_KEYS = ("support_x", "support_y", "query_x")
# Request parameter: accept a model.norm=transductive model's batch-dependent answers for this request (mtl_ray.api).
TRANSDUCTIVE = "transductive"
CHECKPOINT_ARTIFACT = "checkpoint"
# What loading and predicting imports (mtl_ray.api needs no Ray, no scikit-learn); mlflow is added by MLflow.
_RUNTIME_PACKAGES = ("torch", "numpy", "pandas", "pyarrow", "pyyaml", "pillow", "tqdm")


class ServingInputError(UserError, MlflowException):
    """Bad model input. Also an ``MlflowException`` (INVALID_PARAMETER_VALUE), so the scoring server returns
    HTTP 400 with this message instead of a generic error."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


# --------------------------------------------------------------------------- request size
# MLflow 3's scoring server (mlflow/pyfunc/scoring_server: FastAPI under uvicorn) reads the whole body with
# `await request.body()` and parses it before the model sees it; neither it nor uvicorn has a body-size limit or a
# hook for one. So the limit is enforced here, on the inputs as parsed, before adaptation (whose memory and time
# grow with them). The server answers the exception with `e.get_http_status_code()`, hence 413 below (no MLflow
# error code maps to 413). A limit on the raw body belongs in front of the server (e.g. nginx's client_max_body_size).
MAX_REQUEST_BYTES_ENV = "MTL_RAY_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20  # float32: about 10,700 28x28 images, or 390 84x84 RGB ones


class RequestTooLargeError(ServingInputError):
    """A request whose inputs exceed ``$MTL_RAY_MAX_REQUEST_BYTES``: HTTP 413 (Content Too Large)."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=REQUEST_LIMIT_EXCEEDED)

    def get_http_status_code(self) -> int:
        return 413


def max_request_bytes() -> int:
    """The request size limit in bytes: ``$MTL_RAY_MAX_REQUEST_BYTES`` (0: none), else the default (32 MiB)."""
    text = os.environ.get(MAX_REQUEST_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_REQUEST_BYTES
    value = int(text) if text.isdigit() else -1
    if value < 0:  # the server's configuration, not the request: HTTP 500 naming it
        raise MlflowException(f"{MAX_REQUEST_BYTES_ENV}: got {text!r}, expected a whole number of bytes (0: no limit; "
                              f"default {DEFAULT_MAX_REQUEST_BYTES}); fix it where the server runs",
                              error_code=INTERNAL_ERROR)
    return value


def _input_bytes(value: Any, budget: int) -> int:
    """Bytes of one input as the model holds it (arrays: their size; nested lists: 4 per number, as float32),
    counting no further than just past ``budget`` (a huge list costs no more than the limit to size)."""
    if hasattr(value, "detach"):  # a torch tensor
        return int(value.numel() * value.element_size())
    if isinstance(value, np.ndarray) and value.dtype != object:
        return int(value.nbytes)
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, np.ndarray | list | tuple | pd.Series):
        total = 0
        for item in value:
            total += _input_bytes(item, budget - total)
            if total > budget:
                break
        return total
    return 4


def check_request_size(model_input: Any) -> None:
    """Raise :class:`RequestTooLargeError` (HTTP 413) when the request's inputs exceed the limit."""
    limit = max_request_bytes()
    if not limit:
        return
    if isinstance(model_input, pd.DataFrame):
        items = [(str(k), model_input[k].tolist()) for k in model_input.columns]
    elif isinstance(model_input, Mapping):
        items = [(str(k), v) for k, v in model_input.items()]
    else:
        items = [("model input", model_input)]
    sizes: dict[str, int] = {}
    for key, value in items:
        sizes[key] = _input_bytes(value, limit - sum(sizes.values()))
        if sum(sizes.values()) > limit:
            break
    total = sum(sizes.values())
    if total > limit:
        parts = ", ".join(f"{k} {_shape_of(v)} {fmt_bytes(sizes[k])}" for k, v in items if k in sizes)
        raise RequestTooLargeError(
            f"request: got {'at least ' if len(sizes) < len(items) else ''}{total} bytes ({fmt_bytes(total)}) of "
            f"inputs ({parts}), expected at most {limit} ({fmt_bytes(limit)}, {MAX_REQUEST_BYTES_ENV}); send the "
            f"queries in several smaller requests (each with the support set), or raise {MAX_REQUEST_BYTES_ENV} "
            "where the server runs")


def _shape_of(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"{type(value).__name__} of {len(value)}" \
        if hasattr(value, "__len__") else type(value).__name__


def _shape_text(x_shape: Sequence[int], first: str) -> str:
    return f"[{', '.join([first, *map(str, x_shape)])}]"


def _example_text(x_shape: Sequence[int]) -> str:
    return (f"{{'support_x': float32 {_shape_text(x_shape, 'S')}, 'support_y': [S] labels, "
            f"'query_x': float32 {_shape_text(x_shape, 'Q')}}}")


class FewShotModel(PythonModel):
    """Adapts the checkpoint's meta-learner to each request's support set and labels its queries.

    ``predict`` input: a dict (or a one-row DataFrame) with ``support_x [S, *x_shape]`` (float),
    ``support_y [S]`` (labels; float targets for regression) and ``query_x [Q, *x_shape]`` (float).
    Output: numpy array ``[Q]`` of predicted support labels (regression: predicted values, float32).
    See the module docstring for the JSON form ``mlflow models serve`` takes.
    """

    # MLflow's type-hint validation (and its "Add type hints to the `predict` method" warning, at every import
    # of this module: after each training run and in every scoring server) is for models without a signature;
    # this one has a tensor signature, and _unpack checks each request. MLflow's own models skip it the same way.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.learner = FewShotLearner.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], device="cpu")

    @classmethod
    def from_learner(cls, learner: FewShotLearner) -> FewShotModel:
        """A model around an already loaded learner (no MLflow context needed)."""
        model = cls()
        model.learner = learner
        return model

    # Unannotated on purpose: MLflow infers a signature from predict's type hints at every log_model (and warns
    # that Any gives none); this model has its explicit tensor signature.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        check_request_size(model_input)  # HTTP 413 beyond $MTL_RAY_MAX_REQUEST_BYTES, before any work
        shape = self.learner.shape
        support_x, support_y, query_x = self._unpack(model_input)
        transductive = (params or {}).get(TRANSDUCTIVE, False)
        if not isinstance(transductive, bool | np.bool_):
            raise ServingInputError(f"params.{TRANSDUCTIVE}: got {transductive!r}, expected true or false")
        try:
            adapted = self.learner.adapt(support_x, support_y)
            out = adapted.predict(query_x, transductive=bool(transductive))
        except ServingInputError:
            raise
        except UserError as e:  # e.g. a 3-class support set for a model with a 5-way head
            raise ServingInputError(str(e)) from e
        if shape.kind == "regression":
            return out.reshape(-1).cpu().numpy().astype(np.float32)
        if len({type(v) for v in out}) > 1:  # mixed label types: keep each one's type
            return np.array(out, dtype=object)
        return np.asarray(out)

    # ------------------------------------------------------------------ input checks
    def _unpack(self, model_input: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        shape = self.learner.shape
        if isinstance(model_input, pd.DataFrame):
            if len(model_input) != 1:
                raise ServingInputError(
                    f"model input: got a DataFrame with {len(model_input)} rows, expected one row holding one task "
                    f"(columns {', '.join(INPUT_KEYS)}, each cell a whole array); or pass a dict "
                    f"{_example_text(shape.x_shape)}")
            model_input = {k: model_input[k].iloc[0] for k in model_input.columns}
        if not isinstance(model_input, Mapping):
            raise ServingInputError(f"model input: got {type(model_input).__name__}, expected a dict "
                                    f"{_example_text(shape.x_shape)}")
        missing = [k for k in INPUT_KEYS if k not in model_input]
        if missing:
            raise ServingInputError(f"model input: got keys {sorted(map(str, model_input))}, expected "
                                    f"{', '.join(INPUT_KEYS)} (missing {', '.join(missing)}); pass a dict "
                                    f"{_example_text(shape.x_shape)}")
        support_x = self._examples(model_input["support_x"], "support_x", "S")
        query_x = self._examples(model_input["query_x"], "query_x", "Q")
        support_y = self._labels(model_input["support_y"], len(support_x))
        return support_x, support_y, query_x

    def _examples(self, value: Any, key: str, first: str) -> np.ndarray:
        x_shape = tuple(self.learner.shape.x_shape)
        want = _shape_text(x_shape, first)
        try:
            x = _as_array(value, np.float32)
        except (TypeError, ValueError) as e:
            raise ServingInputError(f"{key}: got a value numpy cannot turn into a float array ({e}), expected "
                                    f"numbers of shape {want}; pass a float32 array") from e
        if x.ndim == len(x_shape) and tuple(x.shape) == x_shape:
            hint = f"; for one example add a leading axis (x[None]) to get shape {_shape_text(x_shape, '1')}"
        else:
            hint = (f"; {'resize images to' if len(x_shape) == 3 else 'give examples of'} the shape "
                    f"{list(x_shape)} this model was trained on (FewShotLearner.load_images does it for image files)")
        if x.ndim != len(x_shape) + 1 or tuple(x.shape[1:]) != x_shape:
            raise ServingInputError(f"{key}: got shape {tuple(x.shape)}, expected {want}{hint}")
        if x.shape[0] == 0:
            raise ServingInputError(f"{key}: got 0 examples, expected {want} with {first} >= 1")
        if not np.isfinite(x).all():
            raise ServingInputError(f"{key}: got non-finite values (NaN or inf), expected finite floats; "
                                    "check the preprocessing")
        return x

    def _labels(self, value: Any, count: int) -> Any:
        regression = self.learner.shape.kind == "regression"
        try:
            y = _as_array(value, np.float32 if regression else None)
        except (TypeError, ValueError) as e:
            what = "float targets" if regression else "labels"
            raise ServingInputError(f"support_y: got a value numpy cannot read as {what} ({e}), expected an "
                                    f"array [S] of {what}") from e
        if regression and y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.ndim != 1 or len(y) != count:
            raise ServingInputError(f"support_y: got shape {tuple(y.shape)}, expected [{count}] (one "
                                    f"{'target' if regression else 'label'} per support_x example)")
        if regression:
            if not np.isfinite(y).all():
                raise ServingInputError("support_y: got non-finite targets (NaN or inf), expected finite floats")
            return y
        return y.tolist()  # Python ints / strings, whatever the array's dtype


def _as_array(value: Any, dtype: type | None) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if (isinstance(value, np.ndarray) and value.dtype == object and dtype is not None and value.size
            and isinstance(value.flat[0], np.ndarray | list)):
        # a DataFrame cell of nested lists/arrays can be an object array of arrays: stack it back
        value = np.stack([np.asarray(v) for v in value])
    if isinstance(value, str | bytes):
        raise TypeError(f"a {type(value).__name__}")
    return np.asarray(value, dtype=dtype)


def fewshot_signature(shape: TaskShape) -> ModelSignature:
    """Tensor signature for a model trained on ``shape``: named inputs ``support_x``/``query_x`` float32
    ``[-1, *x_shape]``, ``support_y`` ``[-1]`` (object: any labels; float32 for regression); output ``[-1]``;
    parameter ``transductive`` (boolean, default false)."""
    x = (-1, *(int(d) for d in shape.x_shape))
    y = np.dtype(np.float32) if shape.kind == "regression" else np.dtype(object)
    inputs = Schema([TensorSpec(np.dtype(np.float32), x, "support_x"), TensorSpec(y, (-1,), "support_y"),
                     TensorSpec(np.dtype(np.float32), x, "query_x")])
    params = ParamSchema([ParamSpec(TRANSDUCTIVE, "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(y, (-1,))]), params=params)


def example_input(shape: TaskShape) -> dict[str, np.ndarray]:
    """A minimal valid request for a model trained on ``shape`` (one support example per class, one query)."""
    x = tuple(int(d) for d in shape.x_shape)
    if shape.kind == "regression":
        return {"support_x": np.zeros((2, *x), np.float32), "support_y": np.zeros(2, np.float32),
                "query_x": np.zeros((1, *x), np.float32)}
    return {"support_x": np.zeros((shape.ways, *x), np.float32),
            "support_y": np.array([f"class{i}" for i in range(shape.ways)], dtype=object),
            "query_x": np.zeros((1, *x), np.float32)}


def default_pip_requirements(augment: bool = False) -> list[str]:
    """The packages loading and predicting need, pinned to the installed versions (torch without its local
    ``+cpu``/``+cuXYZ`` label, so ``torch==X.Y.Z`` is met by whichever build the serving machine has); ``augment``:
    also kornia, for a model that augments its support sets when it adapts (``algorithm.finetune_augment``)."""
    reqs = []
    for dist in (*_RUNTIME_PACKAGES, *(("kornia",) if augment else ())):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _resolve_checkpoint(checkpoint_path: str | Path) -> str:
    text = str(checkpoint_path)
    if "://" not in text and Path(text).is_dir():
        found = latest_checkpoint(text)
        if found is None:
            raise UserError(f"{text}: got a directory without checkpoints, expected a .pt file or a run directory "
                            "holding checkpoints/step_XXXXXXXX.pt; train first or pass the checkpoint file")
        return found
    return text


def log_fewshot_model(checkpoint_path: str | Path, name: str = "model", input_example: Any = None, *,
                      pip_requirements: Sequence[str] | None = None, run_id: str | None = None, step: int = 0,
                      registered_model_name: str | None = None) -> ModelInfo:
    """Log a checkpoint as a pyfunc :class:`FewShotModel` into the active MLflow run (or run ``run_id``, in the
    current tracking URI); return its ``ModelInfo``.

    ``checkpoint_path``: a ``.pt`` file from :func:`save_checkpoint` or a run directory (its newest checkpoint);
    it is stored as the model's ``checkpoint`` artifact, with a tensor signature built from the checkpoint's input
    shape (:func:`fewshot_signature`) and the ``mtl_ray`` package as code, so ``mlflow.pyfunc.load_model`` and
    ``mlflow models serve`` need only ``pip_requirements`` (default: :func:`default_pip_requirements`).
    ``input_example``: optional dict ``{"support_x": float32 [S, *x_shape], "support_y": [S],
    "query_x": float32 [Q, *x_shape]}`` saved with the model (MLflow also checks that the model serves it).
    ``step``: the training step the model is from; MLflow links the run's metrics at that step to the logged model.
    ``registered_model_name``: also register it as a new version of that registered model
    (``info.registered_model_version``; :func:`serve_command` serves it).
    """
    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            return log_fewshot_model(checkpoint_path, name, input_example, pip_requirements=pip_requirements,
                                     step=step, registered_model_name=registered_model_name)
    if active is None:
        raise UserError("log_fewshot_model: got no active MLflow run and no run_id, expected one; call it inside "
                        "`with mlflow.start_run():` or pass run_id")
    path = _resolve_checkpoint(checkpoint_path)
    ck = load_checkpoint(path)  # fails early, with a clear message, on a missing or foreign file
    if input_example is None:
        input_example = example_input(ck.shape)
    if input_example is not None:  # MLflow checks it against the signature; a failed trial predict only warns
        FewShotModel.from_learner(FewShotLearner(ck.config, ck.params, ck.shape))._unpack(input_example)
        if ck.config.model.norm == NORM_TRANSDUCTIVE:  # the example says what such a model's requests need
            input_example = (input_example, {TRANSDUCTIVE: True})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=FewShotModel(),
        artifacts={CHECKPOINT_ARTIFACT: path},
        signature=fewshot_signature(ck.shape),
        input_example=input_example,
        code_paths=[str(Path(mtl_ray.__file__).resolve().parent)],
        pip_requirements=list(pip_requirements) if pip_requirements is not None
        else default_pip_requirements(augment=ck.config.algorithm.finetune_augment),
        registered_model_name=registered_model_name,
        step=step,
    )


def serve_command(name: str, version: int | str, tracking_uri: str, *, port: int = 5001) -> str:
    """The shell command that serves version ``version`` of registered model ``name`` from the store at
    ``tracking_uri`` on ``port`` with this Python environment (``--env-manager local``)::

        MLFLOW_TRACKING_URI=sqlite:////abs/runs/mlflow.db PATH=/abs/.venv/bin:"$PATH" \\
            /abs/.venv/bin/mlflow models serve -m models:/mtl-ray-x/1 --env-manager local -p 5001

    ``MLFLOW_TRACKING_URI`` makes ``models:/`` resolve in that store (without it MLflow would look in, and
    create, ``./mlflow.db``); the ``PATH`` entry lets the server find the ``uvicorn`` it starts by name, which
    sits beside this environment's ``mlflow`` even when the environment is not activated.
    """
    bin_dir = Path(sys.executable).parent  # the venv's bin, not the interpreter's resolved location
    mlflow_cli = bin_dir / "mlflow"
    return (f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} PATH={shlex.quote(str(bin_dir))}:\"$PATH\" "
            f"{shlex.quote(str(mlflow_cli))} models serve -m {shlex.quote(f'models:/{name}/{version}')} "
            f"--env-manager local -p {int(port)}")
