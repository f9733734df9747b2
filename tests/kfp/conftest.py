"""Shared fixtures of the KFP tests: the pipeline compiled once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> Path:
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import compile_pipeline

    return Path(compile_pipeline(str(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")))


@pytest.fixture(scope="session")
def spec(compiled) -> dict:
    """(pipeline spec, platform spec) of the compiled pipeline."""
    docs = list(yaml.safe_load_all(compiled.read_text()))
    assert len(docs) == 2, "pipeline spec + kubernetes platform spec"
    return {"pipeline": docs[0], "platform": docs[1]}
