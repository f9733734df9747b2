"""Champion vs challenger, read back from the registry."""
from __future__ import annotations

from typing import Any

from feedback_synth.errors import TrackingError
from feedback_synth.registry.gate import CHALLENGER, CHAMPION, TEST_SET_TAG, metrics_from_tags


def compare_versions(client, name: str) -> dict[str, Any]:
    """Champion and challenger of ``name`` from the registry: versions, metric tags, decisions."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise TrackingError(f"no registered model '{name}': {exc.message}") from None
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    out: dict[str, Any] = {"model_name": name}
    for alias in (CHAMPION, CHALLENGER):
        version = aliases.get(alias)
        if version is None:
            out[alias] = None
            continue
        mv = client.get_model_version(name, version)
        tags = mv.tags or {}
        out[alias] = {"version": version, "metrics": metrics_from_tags(tags), "test_set": tags.get(TEST_SET_TAG),
                      "decision": tags.get("promotion.decision"), "reason": tags.get("promotion.reason"),
                      "run_id": mv.run_id}
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    champ, chall = cmp.get(CHAMPION), cmp.get(CHALLENGER)
    head = lambda who, v: f"{who} v{v['version']}" if v else f"{who} (none)"  # noqa: E731
    keys = [k for k in ("overall", "many", "medium", "few", "worst_class", "average_group", "worst_group")
            if any(v and k in v["metrics"] for v in (champ, chall))]
    lines = [f"registered model {cmp['model_name']}", "",
             f"{'metric':<14}{head('champion', champ):>16}{head('challenger', chall):>18}{'delta':>10}"]
    for k in keys:
        a = champ["metrics"].get(k) if champ else None
        b = chall["metrics"].get(k) if chall else None
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"{k:<14}{fmt(a):>16}{fmt(b):>18}{delta:>10}")
    if champ and chall and champ["version"] == chall["version"]:
        lines += ["", f"the challenger v{chall['version']} is the champion"]
    for who, v in (("champion", champ), ("challenger", chall)):
        if v and v.get("decision"):
            lines.append(f"{who} v{v['version']}: {v['decision']} ({v['reason']})")
    tests = {v["test_set"] for v in (champ, chall) if v and v.get("test_set")}
    if len(tests) > 1:
        lines.append("warning: measured on different test sets: " + " | ".join(sorted(tests)))
    return "\n".join(lines)
