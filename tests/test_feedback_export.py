"""Exports (Parquet, Hugging Face datasets, Pick-a-Pic pairs, dataset card) and Label Studio imports."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from feedback_helpers import make_project
from t2ialign.feedback.export import export
from t2ialign.feedback.labelstudio import LabelStudioError, import_labelstudio
from t2ialign.feedback.simulate import SimulatedRater, simulate
from t2ialign.world import parse, render

PICKAPIC = [
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "user_id",
    "ranking_id",
    "created_at",
]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "proj"
    store = make_project(path, n_prompts=5, per_prompt=3, k=2)
    simulate(store, SimulatedRater("oracle", noise=0.1), pairs_per_prompt=2)
    h = store.annotator_by_token(store.add_annotator("alice"))["id"]
    store.add_label(1, h, "good")
    store.add_label(2, h, "skip")
    store.add_comparison(1, 2, h, "tie")
    yield store
    store.close()


def test_export_parquet_and_pickapic(labelled, tmp_path):
    out = export(labelled, tmp_path / "out", formats="parquet")
    assert out["labels"] == 15 + 1 and out["pairs"] == 10 + 1
    labels = pq.read_table(tmp_path / "out" / "data" / "labels.parquet").to_pylist()
    assert len(labels) == 16 and {r["label"] for r in labels} == {0, 1}
    row = next(r for r in labels if r["annotator"] == "alice")
    assert row["simulated"] is False and row["generation_id"] == 1 and row["label"] == 1
    img = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
    assert np.array_equal(img, labelled.image(1))
    assert json.loads(row["spec"]) == labelled.generation(1)["spec"]
    pick = pq.read_table(tmp_path / "out" / "data" / "pickapic.parquet")
    assert set(PICKAPIC) <= set(pick.column_names)
    rows = pick.to_pylist()
    tie = next(r for r in rows if r["user_id"] == labelled.annotator("alice")["id"])
    assert (tie["label_0"], tie["label_1"], tie["best_image_uid"]) == (0.5, 0.5, "")
    for r in rows:
        assert r["label_0"] + r["label_1"] == 1.0 and r["has_label"]
        Image.open(io.BytesIO(r["jpg_0"])).verify()
    # the Parquet files carry the datasets features: images decode as images
    meta = json.loads(pq.read_schema(tmp_path / "out" / "data" / "labels.parquet").metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: pickapic" in card and "Pick-a-Pic" in card
    assert "sim-oracle" in card
    human = export(labelled, tmp_path / "human", formats="parquet", simulated=False)
    assert human["labels"] == 1 and human["pairs"] == 1


def test_export_hf_dataset(labelled, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    export(labelled, tmp_path / "out", formats="hf", simulated=True)
    ds = datasets.load_from_disk(str(tmp_path / "out" / "hf" / "labels"))
    assert len(ds) == 15 and isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert first["image"].size == (32, 32) and first["simulated"] and first["annotator"] == "sim-oracle"
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "hf" / "pairs"))
    assert len(pairs) == 10 and set(pairs["choice"]) <= {"left", "right", "tie"}
    pick = datasets.load_from_disk(str(tmp_path / "out" / "hf" / "pickapic"))
    assert set(PICKAPIC) <= set(pick.column_names)


def _png_file(path, prompt, seed=0):
    img = render(parse(prompt), seed=seed)
    Image.fromarray(img).save(path)
    return img


def test_import_labelstudio_classification_and_pairs(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    a = _png_file(imgs / "a.png", "two red circles")
    _png_file(imgs / "b.png", "a blue square")
    buf = io.BytesIO()
    Image.fromarray(render(parse("a blue square"), seed=5)).save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/3/1a2b3c4d-a.png", "prompt": "two red circles"},
            "annotations": [
                {
                    "id": 10,
                    "completed_by": 1,
                    "created_at": "2024-05-01T10:00:00.123456Z",
                    "result": [{"type": "choices", "value": {"choices": ["Good"]}}],
                },
                {
                    "id": 11,
                    "completed_by": {"id": 2, "email": "bo@example.org"},
                    "result": [{"type": "choices", "value": {"choices": ["bad"]}}],
                },
                {"id": 12, "completed_by": 3, "was_cancelled": True, "result": []},
            ],
        },
        {
            "id": 2,
            "data": {
                "image1": "/data/local-files/?d=imgs/b.png",
                "image2": data_uri,
                "prompt": "a blue square",
            },
            "annotations": [
                {
                    "id": 20,
                    "completed_by": 1,
                    "result": [{"type": "pairwise", "value": {"selected": "right"}}],
                },
                {"id": 21, "completed_by": 2, "result": [{"type": "choices", "value": {"choices": ["Tie"]}}]},
            ],
        },
    ]
    f = tmp_path / "export.json"
    f.write_text(json.dumps(tasks))
    store = make_project(tmp_path / "p", n_prompts=1, per_prompt=1, k=2)
    out = import_labelstudio(store, f, images=imgs)
    assert (out["tasks"], out["labels"], out["comparisons"], out["duplicates"]) == (2, 3, 2, 0)
    assert out["annotators"] == ["ls-user-1", "ls-user-2", "ls-user-3"]
    rows = store.label_rows()
    assert [(r["annotator"], r["value"]) for r in rows] == [
        ("ls-user-1", "good"),
        ("ls-user-2", "bad"),
        ("ls-user-3", "skip"),
    ]
    assert rows[0]["created_at"] == "2024-05-01T10:00:00.123Z" and not rows[0]["simulated"]
    assert np.array_equal(store.image(rows[0]["generation_id"]), a)
    assert store.annotator("ls-user-1")["kind"] == "imported"
    comps = store.comparison_rows()
    assert [c["choice"] for c in comps] == ["right", "tie"]
    # importing again adds nothing
    again = import_labelstudio(store, f, images=imgs)
    assert again["labels"] == again["comparisons"] == 0 and again["duplicates"] == 5
    assert store.counts()["labels"] == 3
    store.close()


def test_import_maps_images_back_to_their_generations(tmp_path):
    store = make_project(tmp_path / "p", n_prompts=2, per_prompt=2, k=2)
    g = store.generation(3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(store.image(3)).save(imgs / "x.png")
    task = {
        "id": 5,
        "data": {"image": "s3://bucket/x.png", "prompt": g["prompt"]},
        "annotations": [
            {"id": 1, "completed_by": 9, "result": [{"type": "choices", "value": {"choices": ["No"]}}]}
        ],
    }
    (tmp_path / "t.json").write_text(json.dumps([task]))
    n = store.counts()["generations"]
    out = import_labelstudio(store, tmp_path / "t.json", images=imgs)
    assert out["images"] == 0 and store.counts()["generations"] == n
    assert store.label_rows()[0]["generation_id"] == 3
    store.close()


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "not a JSON file"),
        (json.dumps({"rows": 1}), "expected Label Studio's JSON export"),
        (json.dumps([{"id": 1, "data": {"image": "a.png"}}]), "no prompt"),
        (json.dumps([{"id": 1, "data": {"prompt": "a circle"}}]), "no image"),
        (
            json.dumps([{"id": 1, "data": {"image": "https://x.org/missing.png", "prompt": "a circle"}}]),
            "never downloaded",
        ),
        (
            json.dumps(
                [
                    {
                        "id": 4,
                        "data": {"image": "a.png", "prompt": "a circle"},
                        "annotations": [
                            {
                                "id": 1,
                                "completed_by": 1,
                                "result": [{"type": "choices", "value": {"choices": ["Maybe?"]}}],
                            }
                        ],
                    }
                ]
            ),
            "task 4, annotation 1: cannot read 'maybe?'",
        ),
    ],
)
def test_import_errors_name_the_task(tmp_path, content, message):
    (tmp_path / "a.png").write_bytes(b"")
    _png_file(tmp_path / "a.png", "a circle")
    f = tmp_path / "ls.json"
    f.write_text(content)
    store = make_project(tmp_path / "p", n_prompts=1, per_prompt=1, k=1)
    with pytest.raises(LabelStudioError, match=message.replace("?", r"\?")):
        import_labelstudio(store, f)
    store.close()
