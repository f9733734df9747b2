"""The classifier as an MLflow pyfunc model, written as code (no pickle)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import numpy as np

from feedback_synth import storage
from feedback_synth.errors import DataError

_MODEL_CODE = '''"""The feedback-synth classifier as an MLflow pyfunc, written as code (no pickle)."""
import mlflow
from feedback_synth.tracking.pyfunc import ClassifierModel

mlflow.models.set_model(ClassifierModel())
'''


def _define_model_class(base):
    class ClassifierModel(base):
        """pyfunc wrapper: float32 images in [0, 1], (N, C, H, W) -> logits (N, num_classes).

        Its artifact ``checkpoint`` is the classifier's checkpoint folder (safetensors +
        config.json), read by :func:`feedback_synth.classifier.load_classifier`.
        """

        def load_context(self, context) -> None:
            from feedback_synth.training.classifier import load_classifier

            # a serving pod's GPU where it has one ($FEEDBACK_SYNTH_DEVICE sets another: cpu, cuda:1, ...)
            self.clf = load_classifier(context.artifacts["checkpoint"], os.environ.get("FEEDBACK_SYNTH_DEVICE", "auto"))

        # np.ndarray: a hint MLflow accepts without inferring a schema from it (the explicit
        # signature logged with the model is the contract); no hint at all draws a warning
        def predict(self, context, model_input: np.ndarray, params=None):
            import torch

            if isinstance(model_input, dict) and len(model_input) == 1:
                (model_input,) = model_input.values()
            from feedback_synth.devices import module_device

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).to(module_device(self.clf))
            with torch.no_grad():
                return self.clf(x).float().cpu().numpy()

    return ClassifierModel


_MODEL_CLASS = None


def _classifier_model_class():
    """Built on first use, so that importing this module (the CLI does) does not import mlflow."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        import mlflow.pyfunc

        _MODEL_CLASS = _define_model_class(mlflow.pyfunc.PythonModel)
    return _MODEL_CLASS


def __getattr__(name: str):  # PEP 562: ``from feedback_synth.tracking.pyfunc import ClassifierModel``
    if name == "ClassifierModel":
        return _classifier_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def download_checkpoint(model_url: str, dest: str) -> dict[str, Any]:
    """Copy the checkpoint folder (any fsspec URL) to ``dest``; returns its config.json."""
    if not storage.exists(storage.join(model_url, "config.json")) or not storage.exists(storage.join(model_url, "model.safetensors")):
        raise DataError(f"not a classifier checkpoint (needs model.safetensors + config.json): {model_url}")
    os.makedirs(dest, exist_ok=True)
    for name in ("model.safetensors", "config.json", "train_config.yaml"):
        url = storage.join(model_url, name)
        if storage.exists(url):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(storage.read_bytes(url))
    return storage.read_json(storage.join(model_url, "config.json"))


def _model_kwargs(checkpoint_dir: str, spec: dict[str, Any], folder: str) -> dict[str, Any]:
    """What ``mlflow.pyfunc.save_model`` / ``log_model`` take: the code file (written to
    ``folder``), the checkpoint as its one artifact, signature, input example, requirements."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1, spec["in_chans"], spec["image_size"], spec["image_size"])
    # unnamed tensor specs: predict() gets the array itself, not a {name: array} dict
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]))]))
    # batch of 2 (a batch of 1 hides batch-dimension bugs); [0, 1] like real inputs
    example = np.random.default_rng(0).random((2, *shape[1:]), dtype=np.float32)
    code = os.path.join(folder, "feedback_synth_classifier.py")
    with open(code, "w") as f:
        f.write(_MODEL_CODE)
    return dict(python_model=code, artifacts={"checkpoint": checkpoint_dir}, signature=signature,
                input_example=example, pip_requirements=_requirements(),
                metadata={"class_names": spec.get("class_names", []), "timm_model": spec.get("model"),
                          "input": "float32 images in [0, 1], (N, C, H, W); output: logits"})


def log_pyfunc(checkpoint_dir: str, spec: dict[str, Any], model_id: str, run_id: Optional[str] = None,
               name: str = "classifier"):
    """Log the pyfunc model into the MLflow 3 LoggedModel ``model_id`` (``models:/<model_id>``)
    with MLflow's ``log_model``, linked to ``run_id`` as its output; returns MLflow's ``ModelInfo``.
    Uses MLflow's global tracking URI (see ``client.use_tracking_uri``).

    ``Model.log`` is what ``mlflow.pyfunc.log_model(name=...)`` calls; called here directly because
    it also takes the run (``pyfunc.log_model`` only links to the active fluent run).
    """
    import mlflow.pyfunc
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        return Model.log(None, mlflow.pyfunc, name=name, model_id=model_id, run_id=run_id,
                         **_model_kwargs(checkpoint_dir, spec, tmp))


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "timm", "safetensors", "numpy", "mlflow", "feedback-synth"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out
