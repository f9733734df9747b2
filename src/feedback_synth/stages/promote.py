"""The promote stage: register the retrained model in MLflow and move ``champion`` only when it passes
the gate, once per finished evaluation (both runners call ``promote_once``)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from feedback_synth import storage

if TYPE_CHECKING:
    from feedback_synth.reporting.tables import EvaluationReport


def promote_once(parent: Any, retrained_model_url: str, report_url: str, report: "EvaluationReport", promote_cfg: Any,
                 tracking_cfg: Any, test_dataset_url: str) -> dict[str, Any]:
    """Register the retrained model and move ``champion`` if it passes the gate, in a nested
    ``promote`` run, once per finished evaluation: the decision is kept in
    ``<report_url>/promotion.json`` and a second call (a resumed run, a retried task) returns it
    (``resumed: True``) instead of registering a second version."""
    from dataclasses import asdict

    from feedback_synth.fingerprints import digest_of, read_marker
    from feedback_synth.registry.register import register_and_promote

    decision_url = storage.join(report_url, "promotion.json")
    key = digest_of({"evaluation": (read_marker(report_url) or {}).get("digest"),
                     "promote": asdict(promote_cfg), "tracking": asdict(tracking_cfg)})
    if storage.exists(decision_url):
        done = storage.read_json(decision_url)
        if done.get("key") == key:
            return {**done["promotion"], "resumed": True}
    t0 = time.time()
    with parent.stage("promote", asdict(promote_cfg)) as log:
        promotion = register_and_promote(parent, retrained_model_url, report, promote_cfg, run_id=log.run_id,
                                         test_dataset_url=test_dataset_url)
        log.log_metrics({"seconds": round(time.time() - t0, 2)})
    storage.write_json(decision_url, {"key": key, "promotion": promotion, "seconds": round(time.time() - t0, 2)})
    return promotion
