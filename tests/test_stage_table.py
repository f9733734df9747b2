"""The stage table is the one declaration of the pipeline: the runners are built from it, and the
architecture doc's table says what the code says."""
from __future__ import annotations

from pathlib import Path

from feedback_synth.orchestration.stage_table import STAGE_BY_NAME, STAGES, round_inputs

ROOT = Path(__file__).resolve().parents[1]


def _doc_rows() -> dict[str, list[str]]:
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| name | section |")))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_the_architecture_doc_shows_the_table_as_the_code_declares_it():
    doc = _doc_rows()
    assert list(doc) == [s.name for s in STAGES]
    for s in STAGES:
        name, section, folder, reads, writes, gpu, per_round, _ = doc[s.name]
        assert section.strip("`") == (s.section or "-"), s.name
        assert folder.strip("`") == f"{s.folder}/", s.name
        assert [r.strip().strip("`") for r in reads.split(",")] == (list(s.inputs) or ["-"]), s.name
        assert writes.strip("`") == s.output, s.name
        assert (gpu == "yes") == s.gpu and per_round.startswith("yes") == s.per_round, s.name


def test_every_input_is_produced_before_it_is_read():
    produced: set[str] = set()
    for s in STAGES:
        available = produced | ({"latest"} | {f"previous_{o}" for o in produced} if s.per_round else set())
        assert set(s.inputs) <= available | {f"previous_{t.output}" for t in STAGES if t.per_round}, s.name
        assert all(i in available or i.startswith("previous_") for i in s.inputs), s.name
        produced.add(s.output)


def test_rounds_read_the_latest_model_and_the_previous_round():
    first = round_inputs({"baseline": "B", "data": "D"}, None)
    assert first["latest"] == "B" and "previous_retrained" not in first
    second = round_inputs({"baseline": "B", "data": "D"}, {"retrained": "R1", "filtered": "F1"})
    assert second["latest"] == "R1" and second["previous_filtered"] == "F1" and second["baseline"] == "B"


def test_one_vocabulary_of_stage_names():
    """The MLflow run names, the timing keys and kfp-local's order are the table's names."""
    from feedback_synth_kfp.local_runner import _TIMED, STAGE_ORDER
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import COMPONENTS

    assert STAGE_ORDER == tuple(STAGE_BY_NAME)
    assert {stage for _, stage in _TIMED} == {s.name for s in STAGES if not s.sharded}
    assert set(COMPONENTS) == {s.component_name for s in STAGES}


def test_one_body_module_per_stage_named_as_its_component():
    """stages/<component>.py holds each stage's body, components/<component>.py wraps it, and the
    doc's "calls" column names that module."""
    doc = _doc_rows()
    for s in STAGES:
        body = ROOT / "src" / "feedback_synth" / "stages" / f"{s.component_name}.py"
        assert body.is_file(), f"{s.name}: no stage module {body}"
        assert (ROOT / "components" / f"{s.component_name}.py").is_file(), s.name
        function = doc[s.name][-1].strip("` ").split(": ")
        assert function[0] == f"stages/{s.component_name}.py", s.name
        assert f"def {function[1]}(" in body.read_text(), f"{s.name}: {function[1]} is not defined in {body}"
