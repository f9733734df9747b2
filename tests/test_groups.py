"""Group-imbalanced data: digits-groups, metadata CSV and NICO++ folder layouts, per-group plans."""
from __future__ import annotations

import io as _io

import numpy as np
import pytest
from PIL import Image

from feedback_synth import storage
from feedback_synth.config import DataConfig, FeedbackConfig
from feedback_synth.data.digits import make_digits_groups
from feedback_synth.data.imageset import load_split
from feedback_synth.data.prepare import prepare_dataset
from feedback_synth.errors import DataError
from feedback_synth.synthesis.plan import make_plan


@pytest.fixture(scope="module")
def groups_data():
    return make_digits_groups()


def _cells(data):
    return np.bincount(data.labels * 3 + data.groups, minlength=30).reshape(10, 3)


def test_digits_groups_counts_and_disjointness(groups_data):
    d = groups_data
    assert d["train"].group_names == ["red", "green", "blue"]
    train = _cells(d["train"])
    for c in range(10):
        assert train[c, c % 3] == 36 and sorted(train[c].tolist()) == [2, 2, 36]
    assert (_cells(d["test"]) == 16).all() and (_cells(d["pool"]) == 20).all() and (_cells(d["val"]) == 6).all()
    ids = {k: set(v.ids.tolist()) for k, v in d.items() if k != "oracle"}
    keys = list(ids)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not ids[a] & ids[b], (a, b)
    assert d["train"].images.shape[1:] == (16, 16, 3)


def test_group_colour_is_visible(groups_data):
    """Red strokes are red: the group is a real visual attribute, not only a label."""
    tr = groups_data["train"]
    red = tr.images[tr.groups == 0].astype(float).mean(axis=(0, 1, 2))
    blue = tr.images[tr.groups == 2].astype(float).mean(axis=(0, 1, 2))
    assert red[0] > red[2] and blue[2] > blue[0]


def test_per_group_plan_on_digits_groups(groups_data):
    plan = make_plan(groups_data["train"], FeedbackConfig(per_group=True))
    assert plan.target == 36
    assert plan.counts["0/red"] == 1 and plan.counts["0/green"] == 34 and plan.total == 10 * 1 + 20 * 34


def _png(v: int) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_metadata_csv_subpopbench_layout(memory_url):
    src = memory_url + "/src"
    lines = ["filename,y,a,split"]
    for i in range(12):
        storage.write_bytes(storage.join(src, f"img/{i}.png"), _png(10 * i))
        lines.append(f"img/{i}.png,{i % 2},{i % 3},{[0, 0, 0, 1, 2, 2][i % 6]}")
    storage.write_text(storage.join(src, "metadata.csv"), "\n".join(lines) + "\n")
    prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    train, test = load_split(memory_url + "/out", "train"), load_split(memory_url + "/out", "test")
    assert train.class_names == ["0", "1"] and train.group_names == ["0", "1", "2"]
    assert len(train) == 6 and len(test) == 4 and len(load_split(memory_url + "/out", "val")) == 2


def test_metadata_csv_errors_name_the_column_and_row(memory_url):
    src = memory_url + "/src"
    storage.write_text(storage.join(src, "metadata.csv"), "filename,a,split\nx.png,0,0\n")
    with pytest.raises(DataError, match="no label column"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")
    storage.write_text(storage.join(src, "metadata.csv"), "path,label,group,split\nx.png,cat,land,train\nx.png,dog,land,holdout\n")
    with pytest.raises(DataError, match=r"metadata.csv:3: split 'holdout'"):
        prepare_dataset(DataConfig(dataset=src), memory_url + "/out")


def test_nico_domain_class_folders(memory_url):
    src = memory_url + "/nico"
    for dom in ("grass", "water"):
        for cls in ("dog", "cat"):
            for i in range(10):
                storage.write_bytes(storage.join(src, dom, cls, f"{i}.png"), _png(i * 20))
    prepare_dataset(DataConfig(dataset=src, image_size=8), memory_url + "/out")
    train, test = load_split(memory_url + "/out", "train"), load_split(memory_url + "/out", "test")
    assert train.class_names == ["cat", "dog"] and train.group_names == ["grass", "water"]
    assert len(test) == 4 * 2 and len(train) == 4 * 7
    assert not set(train.ids.tolist()) & set(test.ids.tolist())


@pytest.mark.slow
def test_digits_groups_run_end_to_end(tmp_path, capsys):
    """`feedback-synth run --dataset digits-groups` at reduced size, with a tiny joint (class, colour)
    generator: plans per cell, conditions on both, reports average and worst-group accuracy."""
    from builders import build_tiny_pixel_generator

    from feedback_synth.cli.main import main

    gen = build_tiny_pixel_generator(str(tmp_path / "gen"), channels=3, num_conditions=30)  # (class, colour) cells
    out = tmp_path / "run"
    sets = ["train.model=test_resnet", "train.epochs=2", "retrain.epochs=2", "feedback.budget_fraction=0.05",
            "generate.num_inference_steps=4",
            f"generate.generator={gen}", "tracking.enabled=false"]
    rc = main(["run", "--dataset", "digits-groups", "--output", str(out), *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "worst_group" in printed and "average_group" in printed
    summary = storage.read_json(str(out / "report" / "run_summary.json"))
    assert "worst_group" in summary["no_synthesis"] and "worst_group" in summary["retrained"]
    from feedback_synth.generation.shards import read_metadata

    rows = read_metadata(str(out / "generated" / "shards" / "shard-00000" / "metadata.csv"))
    cells = {(r["class_index"], r["group_index"]) for r in rows}
    assert (0, 1) in cells and (0, 2) in cells  # the rare colours of class 0 are planned per cell
