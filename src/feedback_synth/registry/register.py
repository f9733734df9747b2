"""Log the retrained classifier as an MLflow 3 LoggedModel, register it as a new model version,
and apply the gate.

1. The LoggedModel (``models:/m-<id>``, name ``classifier``, type ``classifier``) is made in the
   run's experiment with the promote run as its source run and the checkpoint's training config
   (``train_config.yaml``) as its params; MLflow's ``log_model`` writes the pyfunc model into it
   (models-from-code over the safetensors checkpoint: :mod:`feedback_synth.tracking.pyfunc`). It
   is an output of the promote run and of the parent run (the UI's "Logged models").
2. The retrained model's test metrics (``report['retrained']``) are logged against it
   (``model_id`` and the test dataset, ``test_overall``, ``test_few``, ...), so the model pages,
   the model comparison and ``search_logged_models(datasets=...)`` show them.
3. A new version of ``tracking.registered_model`` is made from ``models:/<model_id>``: the version
   has the LoggedModel's id.
   Registration is idempotent across processes: the LoggedModel and the version carry a promotion
   key (``feedback_synth.promotion_key``: a digest of the registered model, the checkpoint's URL
   and bytes, and its metrics), and a try first looks for what an earlier try with the same key
   made. A process killed after creating the version is resumed on that version (its aliases and
   tags are finished) instead of registering a second one; one killed while logging the model
   leaves a PENDING LoggedModel, which the next try logs into and finalizes.
4. The gate (:func:`feedback_synth.registry.promote.promote_model_version`) compares it with the
   champion's metrics, read back from the registry's version tags; the decision is also tagged on
   the LoggedModel.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from typing import Any, NamedTuple, Optional

from feedback_synth import storage
from feedback_synth.config import PromoteConfig
from feedback_synth.registry.gate import model_id_of
from feedback_synth.registry.locks import make_lock
from feedback_synth.registry.promote import promote_model_version
from feedback_synth.tracking.client import (
    MAX_PARAM_LEN,
    REQUEST_ID_TAG,
    flatten,
    metric_items,
    mlflow_errors,
    say,
    use_tracking_uri,
)
from feedback_synth.tracking.pyfunc import download_checkpoint, log_pyfunc

MODEL_NAME = "classifier"  # the LoggedModel's name (its id is what tells models apart)

MODEL_TYPE = "classifier"

METRIC_PREFIX = "test_"  # the model's metrics: test_overall, test_few, ... on the test dataset

MODEL_URL_TAG = "feedback_synth.model_url"  # LoggedModel tag: the checkpoint it was logged from

# on the LoggedModel and the model version: which promotion made them (``promotion_key``), so that a
# later try of the same promotion (a resumed run, a retried task) finds them instead of making more
PROMOTION_KEY_TAG = "feedback_synth.promotion_key"


class LoggedClassifier(NamedTuple):
    source: str  # models:/<model_id>
    spec: dict[str, Any]  # the checkpoint's config.json
    model_id: str
    reused: bool = False  # an earlier try's LoggedModel (same promotion key), not a new one


def promotion_key(name: str, model_url: str, metrics: dict[str, Any]) -> str:
    """What makes two tries the same promotion: the registered model ``name``, the checkpoint (its
    URL and the digest of its weights and config) and the metrics it is promoted with. A resumed
    run or a retried task has the same key; another model, or the same one with other metrics, not."""
    from feedback_synth.fingerprints import digest_of

    h = hashlib.sha256()
    for file in ("model.safetensors", "config.json"):
        url = storage.join(model_url, file)
        h.update(storage.read_bytes(url) if storage.exists(url) else b"")
    return digest_of({"registered_model": name, "model_url": model_url, "checkpoint": h.hexdigest(),
                      "metrics": metrics})


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _status(model) -> str:
    return getattr(model.status, "name", str(model.status))


def find_logged_model(client, experiment_id: str, key: str):
    """The LoggedModel an earlier try of promotion ``key`` made in the experiment, if any: a READY
    one first, else a PENDING one (its process died while logging it); never a FAILED one."""
    found = client.search_logged_models([experiment_id], max_results=50,
                                        filter_string=f"tags.`{PROMOTION_KEY_TAG}` = '{_quoted(key)}'")
    found = [m for m in found if (m.tags or {}).get(PROMOTION_KEY_TAG) == key and _status(m) in ("READY", "PENDING")]
    found.sort(key=lambda m: (_status(m) != "READY", -(m.creation_timestamp or 0)))
    return found[0] if found else None


def find_version(client, name: str, key: str):
    """The version of registered model ``name`` that an earlier try of promotion ``key`` made, if any."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(
            f"name = '{_quoted(name)}' and tags.`{PROMOTION_KEY_TAG}` = '{_quoted(key)}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    found = [mv for mv in found if mv.name == name and (mv.tags or {}).get(PROMOTION_KEY_TAG) == key]
    return min(found, key=lambda mv: int(mv.version)) if found else None


def checkpoint_test_set(model_url: str) -> Optional[str]:
    """Which test set a checkpoint's metrics come from: its dataset and split (train_config.yaml)."""
    url = storage.join(model_url, "train_config.yaml")
    if not storage.exists(url):
        return None
    data = (storage.read_yaml(url) or {}).get("data") or {}
    if not data.get("dataset"):
        return None
    return f"{data['dataset']} split_seed={data.get('split_seed')} image_size={data.get('image_size')}"


def model_params(model_url: str, spec: dict[str, Any]) -> dict[str, str]:
    """The LoggedModel's params: the checkpoint's training config, flattened, and its architecture."""
    url = storage.join(model_url, "train_config.yaml")
    params = flatten(storage.read_yaml(url) or {}) if storage.exists(url) else {}
    params.update({f"classifier.{k}": spec[k] for k in ("model", "num_classes", "image_size", "in_chans") if k in spec})
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items() if v is not None}


def log_model(tracker, model_url: str, run_id: Optional[str] = None, key: Optional[str] = None) -> LoggedClassifier:
    """Log the checkpoint at ``model_url`` as a LoggedModel (pyfunc, models-from-code, no pickle),
    the output of run ``run_id`` and of the parent run; returns its ``models:/<id>``, the
    checkpoint's config.json and the model id.

    ``key`` (a :func:`promotion_key`): tagged on the model; an earlier try's model with that key
    is used instead of a new one: a READY one as it is, a PENDING one (its process died while
    logging it) is logged into again, which finalizes it READY."""
    run_id = run_id or tracker.current_run_id()
    client = tracker.client
    with mlflow_errors("look for the logged model of an earlier try"):
        earlier = find_logged_model(client, tracker.experiment_id, key) if key else None
    if earlier is not None and _status(earlier) == "READY":
        say(f"registry: reusing the logged model {earlier.model_id} of an earlier try of this promotion")
        _link_outputs(tracker, earlier.model_id, [run_id, tracker.run_id])
        spec = storage.read_json(storage.join(model_url, "config.json"))
        return LoggedClassifier(f"models:/{earlier.model_id}", spec, earlier.model_id, reused=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "checkpoint")
        spec = download_checkpoint(model_url, ckpt)
        if earlier is not None:  # PENDING: an earlier try died while logging it
            say(f"registry: finishing the logged model {earlier.model_id} that an earlier try left PENDING")
            model = earlier
        else:
            model = _create_logged_model(tracker, model_url, run_id, spec, key)
        with mlflow_errors("store the model"), use_tracking_uri(tracker.tracking_uri):
            client.call("log_model", lambda: log_pyfunc(ckpt, spec, model.model_id, run_id, MODEL_NAME))
    _link_outputs(tracker, model.model_id, [tracker.run_id] if tracker.run_id != run_id else [])
    return LoggedClassifier(f"models:/{model.model_id}", spec, model.model_id, reused=earlier is not None)


def _create_logged_model(tracker, model_url: str, run_id: str, spec: dict[str, Any], key: Optional[str]):
    client = tracker.client
    request_id = uuid.uuid4().hex
    tags = {**tracker._base_tags(), MODEL_URL_TAG: model_url, REQUEST_ID_TAG: request_id}
    if key:
        tags[PROMOTION_KEY_TAG] = key
    test_set = checkpoint_test_set(model_url)
    if test_set:
        tags["test_set"] = test_set

    def find():
        found = client.raw.search_logged_models(
            [tracker.experiment_id], filter_string=f"tags.`{REQUEST_ID_TAG}` = '{request_id}'", max_results=1)
        return found[0] if found else None

    with mlflow_errors("create the logged model"):
        return client.create_once("create_logged_model", lambda: client.raw.create_logged_model(
            tracker.experiment_id, name=MODEL_NAME, source_run_id=run_id, tags=tags,
            params=model_params(model_url, spec), model_type=MODEL_TYPE), find)


def _link_outputs(tracker, model_id: str, run_ids) -> None:
    """The runs (a promote run, the parent run) list the LoggedModel as their output ("Logged models")."""
    from mlflow.entities import LoggedModelOutput

    for run_id in dict.fromkeys(r for r in run_ids if r):
        with mlflow_errors("link the logged model to its run"):
            tracker.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def _has_metrics(client, model_id: str, metrics: dict[str, Any], prefix: str = METRIC_PREFIX) -> bool:
    """Whether LoggedModel ``model_id`` has every one of ``metrics`` already (an earlier try logged them)."""
    have = {m.key for m in (client.get_logged_model(model_id).metrics or [])}
    return {k for k, _ in metric_items(metrics, prefix)} <= have


def evaluation_dataset(tracker, run_id: str, dataset_url: Optional[str] = None):
    """The test split the model's metrics were measured on (an ``mlflow.entities.Dataset``), logged
    as an input of run ``run_id``: from ``dataset_url`` when given, else the ``test`` split logged
    on that run or the parent run (``tracking.datasets.log_split_datasets``); None if neither."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from feedback_synth.tracking.datasets import SPLIT_TAG, dataset_input, logged_split, split_dataset

    with mlflow_errors("log the test dataset"):
        if dataset_url:
            inp = dataset_input(split_dataset(dataset_url, "test"), "testing", "test")
            tracker.log_datasets_to(run_id, [inp])
            return inp.dataset
        entity = logged_split(tracker.client, [run_id, tracker.run_id], "test")
        if entity is not None:
            tracker.log_datasets_to(run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "testing"),
                                                                  InputTag(SPLIT_TAG, "test")])], parent=False)
        return entity


def log_model_metrics(tracker, run_id: str, model_id: str, metrics: dict[str, Any], dataset=None,
                      prefix: str = METRIC_PREFIX) -> None:
    """Scalar ``metrics`` logged on run ``run_id`` against the LoggedModel ``model_id`` (and the
    ``dataset`` they were measured on, if known)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, 0, model_id=model_id, dataset_name=getattr(dataset, "name", None),
                    dataset_digest=getattr(dataset, "digest", None)) for k, v in metric_items(metrics, prefix)]
    if items:
        with mlflow_errors("log the model's metrics"):
            tracker.client.log_batch(run_id, metrics=items)


def register_version(tracker, source: str, run_id: str, description: str = "", model_id: Optional[str] = None,
                     key: Optional[str] = None) -> str:
    """A new version of ``tracking.registered_model`` from ``source`` (``models:/<model_id>``);
    returns its number. ``create_model_version`` is not retried blindly: a retry first looks for
    the version by its request id. ``key`` (a :func:`promotion_key`): the version made by an
    earlier try with that key, if there is one, is returned instead of a new one."""
    from mlflow.exceptions import MlflowException

    name = tracker.cfg.registered_model
    client = tracker.client
    with mlflow_errors(f"register the model '{name}'"):
        try:
            client.create_registered_model(name, description="feedback-synth retrained classifier "
                                                             "(champion/challenger aliases)")
        except MlflowException as exc:  # exists already, or a concurrent run created it just now
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                try:  # a concurrent first creation can fail with another code (a unique violation)
                    client.get_registered_model(name)
                except MlflowException:
                    raise exc from None
        mv = find_version(client, name, key) if key else None
        if mv is not None:
            say(f"registry: {name} v{mv.version} was registered by an earlier try of this promotion: finishing it")
            model_id = model_id_of(mv) or model_id
        else:
            request_id = uuid.uuid4().hex
            tags = {REQUEST_ID_TAG: request_id, **({PROMOTION_KEY_TAG: key} if key else {})}

            def find():
                for mv in client.raw.search_model_versions(f"run_id = '{run_id}'"):
                    if mv.name == name and (mv.tags or {}).get(REQUEST_ID_TAG) == request_id:
                        return mv
                return None

            mv = client.create_once("create_model_version", lambda: client.raw.create_model_version(
                name, source=source, run_id=run_id, description=description, model_id=model_id,
                tags=tags), find)
        if model_id:
            link_version(client, model_id, name, str(mv.version))
    return str(mv.version)


def link_version(client, model_id: str, name: str, version: str) -> None:
    """The LoggedModel's ``mlflow.modelVersions`` tag lists the version (what the UI shows as the
    model's and its runs' registered models). A tracking server adds it when the version is
    created; with a local store it is added here, as ``mlflow.register_model`` does."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == str(version) for e in listed):
        # the version as a number, as the server writes it
        entry = {"name": name, "version": int(version) if str(version).isdigit() else version}
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [entry])})



def reference_name(report: dict[str, Any]) -> str:
    """What the gate compares with when there is no champion: the same run without synthesis,
    trained with the same recipe and, by default, the same optimiser steps (the baseline itself
    when it was trained so)."""
    loss = (report.get("recipe") or {}).get("loss")
    steps = ", the same steps" if (report.get("no_synthesis_training") or {}).get("steps") == "same" else ""
    return f"the same run without synthesis ({loss}{steps})" if loss else "baseline of the same run"


def register_and_promote(tracker, model_url: str, report: dict[str, Any], cfg: PromoteConfig,
                         run_id: Optional[str] = None, test_dataset_url: Optional[str] = None,
                         key: Optional[str] = None) -> dict[str, Any]:
    """Log the retrained model as a LoggedModel with its test metrics, register it, then apply the
    champion/challenger gate.

    ``report`` is ``evaluate_run``'s summary: the candidate's metrics are
    ``report['retrained']``, the no-champion reference is ``report['no_synthesis']``.
    ``test_dataset_url``: the prepared dataset whose ``test`` split the metrics were measured on
    (default: the ``test`` split logged on the run or the parent run, if any). Returns the gate's
    result (``promote_model_version``) plus ``model_id``.

    ``key``: what identifies this promotion across processes (default: :func:`promotion_key` of the
    registered model, the checkpoint and ``report['retrained']``). A try whose key an earlier try
    already registered (a process killed mid-promotion, then resumed) finishes that version: no
    second LoggedModel, no second version.
    """
    # MLflow's own code behind some client calls (registering models:/<id> in a local store, the
    # fluent log_model) uses the global tracking URI: the tracker's, for the whole promotion
    with use_tracking_uri(tracker.tracking_uri):
        return _register_and_promote(tracker, model_url, report, cfg, run_id or tracker.current_run_id(),
                                     test_dataset_url, key)


def _register_and_promote(tracker, model_url: str, report: dict[str, Any], cfg: PromoteConfig, run_id: str,
                          test_dataset_url: Optional[str], key: Optional[str]) -> dict[str, Any]:
    name = tracker.cfg.registered_model
    key = key or promotion_key(name, model_url, report["retrained"])
    with mlflow_errors(f"look for a version of '{name}' that an earlier try registered"):
        earlier = find_version(tracker.client, name, key)
    if earlier is not None and model_id_of(earlier):  # killed after registering: finish that version
        model_id = model_id_of(earlier)
        spec = storage.read_json(storage.join(model_url, "config.json"))
        logged = LoggedClassifier(f"models:/{model_id}", spec, model_id, reused=True)
        _link_outputs(tracker, model_id, [run_id, tracker.run_id])
    else:
        logged = log_model(tracker, model_url, run_id, key=key)
    dataset = evaluation_dataset(tracker, run_id, test_dataset_url)
    if not (logged.reused and _has_metrics(tracker.client, logged.model_id, report["retrained"])):
        log_model_metrics(tracker, run_id, logged.model_id, report["retrained"], dataset)
    version = register_version(tracker, logged.source, run_id, description=f"from {model_url}",
                               model_id=logged.model_id, key=key)
    lock = make_lock(cfg.lock_uri, tracker.tracking_uri, name)
    run_ids = list(dict.fromkeys(r for r in (run_id, tracker.run_id) if r))
    with mlflow_errors(f"promote '{name}' v{version}"):
        result = promote_model_version(tracker.client, name, version, report["retrained"], cfg, lock=lock,
                                       baseline_metrics=report.get("no_synthesis"), run_ids=run_ids,
                                       baseline_name=reference_name(report),
                                       test_set=checkpoint_test_set(model_url), tracking_uri=tracker.tracking_uri)
        tracker.client.set_logged_model_tags(logged.model_id, {
            "promotion.decision": result["decision"], "promotion.reason": result["reason"][:5000],
            "promotion.reference": result["reference"], "promotion.model": f"{name}/{version}"})
    result["model_id"] = logged.model_id
    tracker.log_metrics_to(run_id, {"promoted": int(result["promoted"]), "model_version": int(version)}, None, "")
    say(f"registry: {name} v{version} ({logged.source}) "
        f"{'promoted to champion' if result['promoted'] else 'stays challenger'} ({result['reason']})")
    return result
