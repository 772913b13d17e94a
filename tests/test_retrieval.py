"""Embed -> search on a tiny digits model trained here: nearest neighbours, pair-conditioned search, faiss, CLI."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simlap_hf import embed, search
from simlap_hf.data import DataArguments, load_image_dataset
from simlap_hf.retrieval import EmbeddingIndex, Retriever, faiss_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import tiny_run_flags  # noqa: E402

import train_pretrain  # noqa: E402

DATA = ["--dataset_name", "digits", "--max_train_samples", "160", "--max_eval_samples", "40"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SimLAP model trained for one short epoch on 160 digits, and an index of its 160 training images in 2
    shards."""
    root = tmp_path_factory.mktemp("retrieval")
    model_dir, index_dir = root / "model", root / "index"
    train_pretrain.run(
        [
            *DATA,
            *tiny_run_flags(
                model_dir,
                per_device_train_batch_size=48,
                per_device_eval_batch_size=64,
                ra=None,
                num_train_epochs=1,
                warmup_epochs=0,
                checkpointing_epochs=0,
                learning_rate=0.003,
                seed=0,
                logging_steps=None,
            ),
        ]
    )
    info = embed.run(
        [
            *DATA,
            "--model_name_or_path",
            str(model_dir),
            "--output_dir",
            str(index_dir),
            "--split",
            "train",
            "--shard_size",
            "100",
            "--batch_size",
            "64",
        ]
    )
    queries = load_image_dataset(DataArguments(dataset_name="digits", max_train_samples=160, max_eval_samples=40))[
        "validation"
    ]
    return model_dir, index_dir, info, queries


def test_index_holds_the_models_features_and_embeddings(trained):
    model_dir, index_dir, info, _ = trained
    assert info["num_rows"] == 160 and [s["rows"] for s in info["shards"]] == [100, 60]
    assert info["feature_dim"] == 512 and info["embedding_dim"] == 16
    index = EmbeddingIndex(index_dir)
    retriever = Retriever(model_dir, index)
    train = load_image_dataset(DataArguments(dataset_name="digits", max_train_samples=160))["train"]
    for row in (0, 150, 159):  # both shards: the stored vectors are the model's on the eval transform
        encoded = retriever.encode(train[row]["image"])
        torch.testing.assert_close(index.all_vectors("features")[row], encoded["features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(index.all_vectors("embeddings")[row], encoded["embeddings"], rtol=1e-5, atol=1e-5)
        assert index.rows([row])[0] | {"score": 0} == {
            "source": f"train/{row}",
            "label": str(train[row]["label"]),
            "label_id": train[row]["label"],
            "split": "train",
            "row": row,
            "index_id": row,
            "score": 0,
        }


def test_nearest_neighbours_are_exact_cosine_and_find_the_image_itself(trained):
    model_dir, index_dir, _, _ = trained
    retriever = Retriever(model_dir, index_dir)
    train = load_image_dataset(DataArguments(dataset_name="digits", max_train_samples=160))["train"]
    hits = retriever.search(train[123]["image"], k=4)
    assert hits[0]["index_id"] == 123 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    for hit in hits:  # the images of the hits, reloaded from the data the index records
        assert retriever.index.image(hit["index_id"]).tobytes() == train[hit["row"]]["image"].tobytes()
    stored = retriever.index.all_vectors("features").double()
    query = retriever.encode(train[123]["image"])["features"].double()
    expected = F.cosine_similarity(stored, query.unsqueeze(0), dim=1).topk(4)
    assert [hit["index_id"] for hit in hits] == expected.indices.tolist()
    assert [hit["score"] for hit in hits] == pytest.approx(expected.values.tolist(), rel=1e-5)


def test_pair_search_returns_only_the_target_class_scored_by_the_gated_cosine(trained):
    model_dir, index_dir, _, queries = trained
    retriever = Retriever(model_dir, index_dir)
    stored, labels = retriever.index.all_vectors("embeddings").double(), retriever.index.all_labels()
    for position, target in ((0, "3"), (1, "8"), (2, "0")):
        image = queries[position]["image"]
        result = retriever.pair_search(image, target_class=target, k=6)
        predicted = retriever.predict(image, k=1)[0]["label"]
        assert result["query_class"] == predicted and result["target_class"] == target
        hits = result["hits"]
        assert len(hits) == 6 and {hit["label"] for hit in hits} == {target}
        # The gated cosine computed directly (float64, elementwise) over every item of the target class:
        # cos(g * z_q, g * z_n) with g = g(query class, target class).
        a, b = (retriever.model_label_names.index(name) for name in (predicted, target))
        with torch.no_grad():
            gate = retriever.model.gate(torch.tensor([a]), torch.tensor([b]))[0].double()
        z_q = retriever.encode(image)["embeddings"].double()
        members = (labels == int(target)).nonzero().flatten()
        direct = F.cosine_similarity(gate * stored[members], (gate * z_q).unsqueeze(0), dim=1)
        expected = direct.topk(6)
        assert [hit["index_id"] for hit in hits] == members[expected.indices].tolist()
        # Search computes in float32 with the loss's two-matmul form: a relative error of a few float32 ulps
        # (K=16 products summed), far below 1e-5.
        assert [hit["score"] for hit in hits] == pytest.approx(expected.values.tolist(), rel=1e-5)
    # A given query class replaces the prediction, and the gate changes the ranking's scores.
    forced = retriever.pair_search(queries[0]["image"], target_class="3", k=3, query_class="5")
    assert forced["query_class"] == "5" and {hit["label"] for hit in forced["hits"]} == {"3"}


def test_chunked_search_equals_one_pass(trained):
    _, index_dir, _, _ = trained
    index = EmbeddingIndex(index_dir, cache=False)
    queries = index.all_vectors("features")[[5, 77, 141]] + 0.1
    full = index.search(queries, k=7, chunk_size=1_000_000)
    chunked = index.search(queries, k=7, chunk_size=13)
    assert torch.equal(full[1], chunked[1])
    torch.testing.assert_close(full[0], chunked[0])
    everything = index.search(queries, k=10_000, chunk_size=50)  # k beyond the index: every row once, ranked
    assert everything[1].shape == (3, 160) and all(len(set(row.tolist())) == 160 for row in everything[1])
    gate = torch.rand(16)
    one = index.pair_search(index.all_vectors("embeddings")[3], gate, 4, k=5, chunk_size=1_000_000)
    many = index.pair_search(index.all_vectors("embeddings")[3], gate, 4, k=5, chunk_size=3)
    assert torch.equal(one[1], many[1])


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install 'simlap-hf[faiss]')")
def test_faiss_and_torch_give_the_same_hits(trained):
    _, index_dir, _, _ = trained
    index = EmbeddingIndex(index_dir)
    generator = torch.Generator().manual_seed(0)
    for column in ("features", "embeddings"):
        stored = index.all_vectors(column)
        queries = stored[torch.randint(0, len(stored), (12,), generator=generator)]
        queries = queries + 0.05 * torch.randn(queries.shape, generator=generator) * stored.std()
        scores_torch, ids_torch = index.search(queries, k=10, column=column, backend="torch")
        scores_faiss, ids_faiss = index.search(queries, k=10, column=column, backend="faiss")
        assert torch.equal(ids_torch, ids_faiss)
        torch.testing.assert_close(scores_torch, scores_faiss, rtol=1e-5, atol=1e-5)


def test_search_command_prints_json_hits(trained, tmp_path, capsys):
    model_dir, index_dir, _, queries = trained
    image_file = tmp_path / "query.png"
    queries[0]["image"].save(image_file)
    assert search.main(["--index", str(index_dir), "--image", str(image_file), "--k", "3"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["mode"] == "nearest" and len(plain["hits"]) == 3
    assert {"source", "label", "score"} <= set(plain["hits"][0])
    assert (
        search.main(
            [
                "--index",
                str(index_dir),
                "--image",
                str(image_file),
                "--k",
                "2",
                "--target_class",
                "9",
                "--query_class",
                "1",
            ]
        )
        == 0
    )
    paired = json.loads(capsys.readouterr().out)
    assert paired["mode"] == "pair" and paired["query_class"] == "1"
    assert [hit["label"] for hit in paired["hits"]] == ["9", "9"]
    # Mistakes get one line naming the flag and the fix.
    assert search.main(["--index", str(index_dir), "--image", str(image_file), "--target_class", "cat"]) == 1
    assert "--target_class 'cat' is not a class" in capsys.readouterr().err
    assert search.main(["--index", str(tmp_path), "--image", str(image_file)]) == 1
    assert "python -m simlap_hf.embed" in capsys.readouterr().err
    assert search.main(["--index", str(index_dir), "--image", str(tmp_path / "missing.png")]) == 1
    assert "--image" in capsys.readouterr().err


def test_embed_refuses_a_non_empty_output_dir(trained, tmp_path):
    model_dir, _, _, _ = trained
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        embed.run([*DATA, "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not an embedding index"):
        embed.run(
            [*DATA, "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path), "--overwrite_output_dir"]
        )
    assert (tmp_path / "notes.txt").is_file()
    with pytest.raises(FileNotFoundError, match="--model_name_or_path"):
        embed.run([*DATA, "--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")])


def test_pretraining_saves_processor_and_class_relations_beside_the_model(trained):
    model_dir, _, _, _ = trained
    for name in ("preprocessor_config.json", "class_relations.json", "class_relations.png"):
        assert (model_dir / name).is_file(), name
    relations = json.loads((model_dir / "class_relations.json").read_text())
    assert relations["measure"] == "gate_entropy" and relations["label_names"] == [str(i) for i in range(10)]
    card = (model_dir / "README.md").read_text()
    assert "## Class relations" in card and "class_relations.png" in card


def test_search_refuses_another_models_index_and_names_missing_shards_and_folders(trained, tmp_path, capsys):
    model_dir, index_dir, _, queries = trained
    image_file = tmp_path / "query.png"
    queries[0]["image"].save(image_file)
    other_model = tmp_path / "other-model"
    shutil.copytree(model_dir, other_model)  # another folder: the index cannot know it holds the same weights
    command = ["--index", str(index_dir), "--image", str(image_file), "--model_name_or_path", str(other_model)]
    assert search.main(command) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --model_name_or_path") and "--allow_other_model" in line
    assert search.main([*command, "--allow_other_model"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"]
    assert search.main(["--index", str(index_dir), "--image", str(tmp_path)]) == 1
    assert "is a folder; pass one image file" in capsys.readouterr().err
    damaged = tmp_path / "damaged-index"
    shutil.copytree(index_dir, damaged)
    shard = next(damaged.rglob("*.parquet"))
    shard.unlink()
    assert search.main(["--index", str(damaged), "--image", str(image_file)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(shard) in line and "Build it again" in line


def test_embed_overwrite_replaces_an_index_only_once_the_new_one_is_complete(trained, tmp_path, monkeypatch):
    model_dir, index_dir, _, _ = trained
    target = tmp_path / "index"
    shutil.copytree(index_dir, target)
    before = {path.name: path.read_bytes() for path in target.rglob("*") if path.is_file()}
    command = [*DATA, "--model_name_or_path", str(model_dir), "--output_dir", str(target), "--overwrite_output_dir"]
    command += ["--split", "validation"]
    original = embed.write_index

    def fails_halfway(*args, **kwargs):
        folder = Path(args[4])
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        (folder / "shards" / "partial.parquet").write_bytes(b"cut short")
        raise OSError("disk full")

    monkeypatch.setattr(embed, "write_index", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        embed.run(command)
    assert {path.name: path.read_bytes() for path in target.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]  # no half-written index left beside it
    monkeypatch.setattr(embed, "write_index", original)
    info = embed.run(command)
    assert info["num_rows"] == 40 and json.loads((target / "index.json").read_text())["num_rows"] == 40
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index"]
