"""What ``feedback-synth compare`` shows: two versions of a registered model side by side, read
back from the registry, each with its gate decision and reason (printed once).

Which two (the reference on the left; delta = right - left):

- the **champion** and the **latest challenger**, when they differ (the challenger was rejected,
  or did not get the promotion lock);
- after a promotion (champion == challenger): the **previous champion** (the new champion's
  ``promotion.previous_champion`` tag, else the ``champion vN`` its gate compared it with) and the
  **new champion**;
- just one when there is nothing to compare it with: the first champion (promoted against its
  run's baseline), or a challenger with no champion;
- ``--versions A B``: any two.

The metrics are the ones the gate compares: the version's ``metric.*`` tags (else the test
metrics of its LoggedModel).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from feedback_synth.config import METRICS
from feedback_synth.errors import TrackingError
from feedback_synth.registry.gate import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION_TAG,
    TEST_SET_TAG,
    metrics_from_tags,
    model_id_of,
)

MODEL_METRIC_PREFIX = "test_"  # registry.register logs the LoggedModel's metrics as test_<name>


def _aliases(model) -> dict[str, str]:
    return {k: str(v) for k, v in (model.aliases or {}).items()}


def _model_metrics(client, model_id: Optional[str]) -> dict[str, float]:
    if not model_id:
        return {}
    try:
        model = client.get_logged_model(model_id)
    except Exception:  # noqa: BLE001 - an old server, a deleted model: no metrics to show
        return {}
    return {m.key[len(MODEL_METRIC_PREFIX):]: m.value for m in (model.metrics or [])
            if m.key.startswith(MODEL_METRIC_PREFIX)}


def version_info(client, name: str, version: str, aliases: dict[str, str]) -> dict[str, Any]:
    """One version: its aliases, metrics, test set, gate decision, and the run and model it came from."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise TrackingError(f"'{name}' has no version {version}: {exc.message}") from None
    tags = mv.tags or {}
    model_id = model_id_of(mv)
    return {"version": str(mv.version), "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
            "metrics": metrics_from_tags(tags) or _model_metrics(client, model_id), "test_set": tags.get(TEST_SET_TAG),
            "decision": tags.get("promotion.decision"), "reason": tags.get("promotion.reason"),
            "reference": tags.get("promotion.reference"), "previous_champion": tags.get(PREVIOUS_CHAMPION_TAG),
            "run_id": mv.run_id, "model_id": model_id}


def previous_champion(info: dict[str, Any]) -> Optional[str]:
    """The champion that ``info``'s version replaced when it was promoted, if any."""
    if info.get("previous_champion"):
        return str(info["previous_champion"])
    m = re.fullmatch(r"champion v(\d+)", info.get("reference") or "")
    return m.group(1) if m and info.get("decision") == "promoted" and m.group(1) != info["version"] else None


def compare_versions(client, name: str, versions: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """The two versions to compare (see the module doc), with their metrics and decisions.

    Returns ``{model_name, aliases, kind, columns: [{role, version}], versions: {version: info},
    delta: {metric: right - left}, champion, challenger}`` (the last two: the infos of the aliased
    versions, or None).
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise TrackingError(f"no registered model '{name}': {exc.message}") from None
    aliases = _aliases(model)
    infos: dict[str, dict[str, Any]] = {}

    def info(version: str) -> dict[str, Any]:
        if version not in infos:
            infos[version] = version_info(client, name, version, aliases)
        return infos[version]

    champ, chall = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if versions:
        kind, columns = "versions", [("version", str(v)) for v in versions]
    elif champ and chall and champ != chall:
        kind, columns = "champion_vs_challenger", [(CHAMPION, champ), (CHALLENGER, chall)]
    elif champ:
        prev = previous_champion(info(champ))
        if prev:
            kind, columns = "previous_champion_vs_champion", [("previous champion", prev), (CHAMPION, champ)]
        else:
            kind, columns = "champion", [(CHAMPION, champ)]
    elif chall:
        kind, columns = "challenger", [(CHALLENGER, chall)]
    else:
        kind, columns = "none", []
    for _, version in columns:
        info(version)
    delta: dict[str, float] = {}
    if len(columns) == 2:
        a, b = (infos[v]["metrics"] for _, v in columns)
        delta = {k: b[k] - a[k] for k in _metric_keys([a, b]) if k in a and k in b}
    return {"model_name": name, "aliases": aliases, "kind": kind,
            "columns": [{"role": role, "version": v} for role, v in columns],
            "versions": {v: infos[v] for _, v in columns}, "delta": delta,
            CHAMPION: info(champ) if champ else None, CHALLENGER: info(chall) if chall else None}


def _metric_keys(metric_dicts: list[dict[str, float]]) -> list[str]:
    present = set().union(*metric_dicts) if metric_dicts else set()
    return [k for k in METRICS if k in present] + sorted(present - set(METRICS))


def _heading(cmp: dict[str, Any]) -> str:
    kind, cols, infos = cmp["kind"], cmp["columns"], cmp["versions"]
    if kind == "champion_vs_challenger":
        decision = infos[cols[1]["version"]].get("decision") or "no decision recorded"
        return f"the champion vs the latest challenger ({decision})"
    if kind == "previous_champion_vs_champion":
        return f"the champion v{cols[1]['version']} vs the champion it replaced, v{cols[0]['version']}"
    if kind == "champion":
        ref = infos[cols[0]["version"]].get("reference") or "nothing"
        return f"the first champion (promoted vs {ref}): no earlier champion to compare with"
    if kind == "challenger":
        return "no champion yet: the latest challenger"
    if kind == "versions":
        return f"v{cols[0]['version']} vs v{cols[1]['version']}"
    return "no version has the alias champion or challenger"


def format_comparison(cmp: dict[str, Any]) -> str:
    cols, infos, aliases = cmp["columns"], cmp["versions"], cmp["aliases"]
    alias_text = ", ".join(f"{a} v{v}" for a, v in sorted(aliases.items()))
    lines = [f"registered model {cmp['model_name']}" + (f" ({alias_text})" if alias_text else ""), _heading(cmp)]
    if not cols:
        return "\n".join(lines)
    heads = [f"{c['role']} v{c['version']}" for c in cols]
    widths = [max(len(h), 8) + 4 for h in heads]
    metrics = [infos[c["version"]]["metrics"] for c in cols]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines += ["", f"{'metric':<14}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths))
              + (f"{'delta':>10}" if len(cols) == 2 else "")]
    for k in _metric_keys(metrics):
        row = f"{k:<14}" + "".join(f"{fmt(m.get(k)):>{w}}" for m, w in zip(metrics, widths))
        if len(cols) == 2:
            row += f"{cmp['delta'][k]:>+10.4f}" if k in cmp["delta"] else f"{'-':>10}"
        lines.append(row)
    lines.append("")
    seen = set()
    for c, head in zip(cols, heads):  # one line per version (--versions 3 3 prints it once)
        if c["version"] in seen:
            continue
        seen.add(c["version"])
        v = infos[c["version"]]
        lines.append(f"{head}: {v['decision']} ({v['reason']})" if v.get("decision")
                     else f"{head}: no gate decision recorded")
    models = [f"v{c['version']} {infos[c['version']]['model_id']}" for c in cols if infos[c["version"]].get("model_id")]
    if models:
        lines.append("logged models: " + ", ".join(models))
    tests = {infos[c["version"]]["test_set"] for c in cols if infos[c["version"]].get("test_set")}
    if len(tests) > 1:
        lines.append("warning: measured on different test sets: " + " | ".join(sorted(tests)))
    return "\n".join(lines)
