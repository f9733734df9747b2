"""Champion/challenger promotion: the gate, the lock that serialises it, and the alias moves.

Every new model version gets the alias ``challenger``. The alias ``champion`` moves to it only if
it passes the gate against the current champion (or, when there is none, the baseline of the same
run), both measured on the same test set. The metrics are stored on each model version as tags
(``metric.<name>``), so the champion's numbers are read back from the registry, not remembered.

MLflow aliases are last-writer-wins, not compare-and-set (mlflow #10336): two runs finishing at
once could each read the old champion, each pass the gate and each move the alias, leaving the
worse one as champion. So read-compare-move-read back runs inside a lock that holds across pods:

    ''                         a file lock (the filelock package) beside a local store (sqlite:/file: tracking URI);
                               the tracking database itself for a postgresql tracking URI
    postgresql://... (also postgresql+psycopg2://, postgres://)
                               pg_advisory_lock on that database (the lock dies with the session,
                               so a killed pod never leaves it held)
    file:///path/to/lockfile   an explicit file lock (pods sharing a volume)

The functions here (and in ``registry.gate`` and ``registry.locks``) take an ``MlflowClient``-like object and plain dicts, so the gate is a pure
function and the promotion can be tested against any client.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

from feedback_synth.config import PromoteConfig
from feedback_synth.errors import TrackingError
from feedback_synth.registry.gate import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAGS,
    PREVIOUS_CHAMPION_TAG,
    TEST_SET_TAG,
    gate_decision,
    metric_tags,
    metrics_from_tags,
)
from feedback_synth.registry.locks import LockTimeout, held, make_lock, utcnow


def _aliases(client, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}


def _set_challenger(client, name: str, version: str) -> None:
    """``challenger`` = the newest version that asked for promotion (never moves backwards)."""
    current = _aliases(client, name).get(CHALLENGER)
    if current is None or int(current) < int(version):
        client.set_registered_model_alias(name, CHALLENGER, version)


def promote_model_version(client, name: str, version: str | int, metrics: dict[str, Any], cfg: PromoteConfig,
                          lock=None, baseline_metrics: Optional[dict[str, Any]] = None,
                          baseline_name: str = "baseline of the same run",
                          run_ids: tuple[str, ...] | list[str] = (), test_set: Optional[str] = None,
                          tracking_uri: str = "") -> dict[str, Any]:
    """Apply the gate to model version ``name``/``version`` and move ``champion`` if it passes.

    1. tag the version with its metrics (and test set), so that later gates can read them back;
    2. under the lock: move ``challenger`` to it, re-read ``champion``, compare against the
       champion's tags (or ``baseline_metrics`` when there is no champion), move ``champion`` if
       the gate passes and read the alias back;
    3. write the decision and reason as tags on the version and on every run in ``run_ids`` (and,
       on a version that replaced a champion, that champion's number: ``promotion.previous_champion``).
    A lock timeout leaves the version as challenger with the reason. Returns
    ``{model_name, version, promoted, reason, champion_version, decision, reference}``.
    """
    version = str(version)
    lock = lock if lock is not None else make_lock(cfg.lock_uri, tracking_uri, name)
    # 1. the metrics travel with the version
    tags = metric_tags(metrics)
    if test_set:
        tags[TEST_SET_TAG] = test_set
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    reference_desc = ""
    try:
        with held(lock, cfg.lock_timeout_s):
            # 2. inside the lock: read, compare, move, read back
            _set_challenger(client, name, version)
            champion = _aliases(client, name).get(CHAMPION)
            promoted, reason, reference_desc = _gate_against(client, name, version, champion, metrics, cfg,
                                                             baseline_metrics, baseline_name, test_set)
            if promoted and champion != version:
                client.set_registered_model_alias(name, CHAMPION, version)
                now = _aliases(client, name).get(CHAMPION)
                if now != version:
                    raise TrackingError(f"registry read-back: alias '{CHAMPION}' of '{name}' is v{now} right "
                                        f"after moving it to v{version} under the {lock}")
            decision = "promoted" if promoted else "rejected"
            reason = f"vs {reference_desc}: {reason}"
            champion_version = version if promoted else champion
            replaced = {PREVIOUS_CHAMPION_TAG: champion} if promoted and champion not in (None, version) else {}
            _write_decision(client, name, version, run_ids, decision, reason, reference_desc, lock, replaced)
    except LockTimeout as exc:
        decision, promoted = "lock_timeout", False
        reason = f"stays challenger: promotion lock not acquired: {exc}"
        with contextlib.suppress(Exception):  # best effort: outside the lock the alias may race
            _set_challenger(client, name, version)
        champion_version = _aliases(client, name).get(CHAMPION)
        _write_decision(client, name, version, run_ids, decision, reason, "", lock)
    return {"model_name": name, "version": version, "promoted": promoted, "reason": reason,
            "champion_version": champion_version, "decision": decision, "reference": reference_desc}


def _gate_against(client, name: str, version: str, champion: Optional[str], metrics: dict[str, Any],
                  cfg: PromoteConfig, baseline_metrics: Optional[dict[str, Any]], baseline_name: str,
                  test_set: Optional[str]) -> tuple[bool, str, str]:
    """The gate's decision for ``version`` against the current ``champion`` (its tagged metrics),
    or ``baseline_metrics`` when there is none: ``(promoted, reason, what it was compared with)``.
    A champion measured on another test set is not comparable: rejected."""
    if champion == version:
        return True, "already champion", f"champion v{version}"
    if champion is not None:
        champ = client.get_model_version(name, champion)
        champ_set = (champ.tags or {}).get(TEST_SET_TAG)
        if test_set and champ_set and champ_set != test_set:
            return False, (f"champion v{champion} was measured on a different test set ({champ_set}, this model: "
                           f"{test_set}); not comparable"), f"champion v{champion}"
        promoted, reason = gate_decision(metrics, metrics_from_tags(champ.tags or {}), cfg)
        return promoted, reason, f"champion v{champion}"
    if baseline_metrics is not None:
        promoted, reason = gate_decision(metrics, baseline_metrics, cfg)
        return promoted, reason, baseline_name
    promoted, reason = gate_decision(metrics, None, cfg)
    return promoted, reason, "nothing"


def _write_decision(client, name: str, version: str, run_ids, decision: str, reason: str, reference: str,
                    lock, version_only: Optional[dict[str, str]] = None) -> None:
    values = dict(zip(DECISION_TAGS, (decision, reason, reference, str(lock))))
    values["promotion.decided_at"] = utcnow().isoformat(timespec="seconds")
    for key, value in {**values, **(version_only or {})}.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    run_values = {**values, "promotion.model": f"{name}/{version}"}
    for run_id in run_ids:
        if run_id:
            for key, value in run_values.items():
                client.set_tag(run_id, key, value[:5000])
