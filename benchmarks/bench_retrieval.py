#!/usr/bin/env python
"""Embedding throughput and search latency of ``simlap_hf.embed`` / ``simlap_hf.retrieval``.

    python benchmarks/bench_retrieval.py                       # 2,000 images; 100k and 1M stored vectors
    python benchmarks/bench_retrieval.py --sizes 100000 --num_images 500 --threads 2

1. **Embedding**: ``write_index`` on PNG images stored in a ``datasets`` table (decode, the evaluation transform,
   backbone + projector, parquet shards), with a SimLAP ResNet-18 (deep stem, output stride 8) at 32x32, the
   seed's CIFAR setting; images/s over the whole path.
2. **Search**: synthetic indexes of N random unit vectors (dimension ``--dim``, 10 classes) written as parquet
   shards; per-query latency (median of ``--queries`` single-image queries, after loading) of the exact torch search
   (chunks of 65,536 rows, running top-10), of a faiss flat inner-product index (exact as well) when faiss is
   installed, and of the pair-conditioned search (exact gated cosine over the ~N/10 items of one class). The hits
   of torch and faiss are compared.

Prints a markdown table; ``--output FILE`` also writes it with the settings as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
from PIL import Image  # noqa: E402

from simlap_hf import SimLAPConfig, SimLAPModel  # noqa: E402
from simlap_hf.data import DataArguments  # noqa: E402
from simlap_hf.embed import _fixed_list, write_index  # noqa: E402
from simlap_hf.retrieval import EmbeddingIndex, faiss_available  # noqa: E402


def embedding_throughput(num_images: int, batch_size: int, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(num_images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    names = [f"c{i}" for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"image": images, "label": (np.arange(num_images) % 10).tolist()}, features)
    config = SimLAPConfig(
        backbone="resnet18",
        backbone_kwargs={"stem_type": "deep", "output_stride": 8},
        num_classes=10,
        image_size=32,
        id2label=dict(enumerate(names)),
    )
    model = SimLAPModel(config).eval()
    data_args = DataArguments(dataset_name="cifar10", input_size=32)
    write_index(
        model,
        {"train": table.select(range(min(64, num_images)))},
        names,
        data_args,
        workdir / "warmup",
        model_name_or_path="benchmark",
        batch_size=batch_size,
        show_progress=False,
    )
    start = time.perf_counter()
    info = write_index(
        model,
        {"train": table},
        names,
        data_args,
        workdir / "embed",
        model_name_or_path="benchmark",
        batch_size=batch_size,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    return {
        "images": num_images,
        "seconds": seconds,
        "images_per_second": num_images / seconds,
        "feature_dim": info["feature_dim"],
        "embedding_dim": info["embedding_dim"],
    }


def synthetic_index(path: Path, rows: int, dim: int, shard_size: int = 250_000, seed: int = 0) -> None:
    """An index of random vectors in the format of simlap_hf.embed (features and embeddings share the vectors)."""
    rng = np.random.default_rng(seed)
    (path / "data").mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, rows, shard_size)):
        count = min(shard_size, rows - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        column = _fixed_list(vectors)
        table = pa.table(
            {
                "features": column,
                "embeddings": column,
                "label": pa.array(rng.integers(0, 10, count)),
                "source": pa.array([f"synthetic/{start + i}" for i in range(count)]),
                "split": pa.array(["train"] * count),
                "row": pa.array(np.arange(start, start + count)),
            }
        )
        name = f"shard-{number:05d}.parquet"
        pq.write_table(table, path / "data" / name)
        shards.append({"file": f"data/{name}", "rows": count, "split": "train"})
    info = {
        "format": "simlap-embedding-index/1",
        "label_names": [f"c{i}" for i in range(10)],
        "num_rows": rows,
        "feature_dim": dim,
        "embedding_dim": dim,
        "has_embeddings": True,
        "shards": shards,
    }
    (path / "index.json").write_text(json.dumps(info))


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def search_latency(rows: int, dim: int, queries: int, workdir: Path) -> dict:
    path = workdir / f"index_{rows}"
    start = time.perf_counter()
    synthetic_index(path, rows, dim)
    write_seconds = time.perf_counter() - start
    index = EmbeddingIndex(path)
    start = time.perf_counter()
    index.search(torch.randn(dim), k=10)  # loads and normalises the shards once
    load_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    query_set = torch.randn(queries, dim, generator=generator)
    result = {"rows": rows, "dim": dim, "write_seconds": write_seconds, "load_seconds": load_seconds}
    torch_times, torch_ids = [], []
    for query in query_set:
        ms, (_, ids) = timed(lambda q=query: index.search(q, k=10), 1)
        torch_times.append(ms)
        torch_ids.append(ids)
    result["torch_ms"] = statistics.median(torch_times)
    batch_ms, _ = timed(lambda: index.search(query_set, k=10), 3)
    result["torch_batch_ms_per_query"] = batch_ms / queries
    gate = torch.rand(dim, generator=generator)
    pair_times = [timed(lambda q=query: index.pair_search(q, gate, 3, k=10), 1)[0] for query in query_set]
    result["pair_ms"] = statistics.median(pair_times)
    if faiss_available():
        start = time.perf_counter()
        index.search(query_set[0], k=10, backend="faiss")  # builds the flat index
        result["faiss_build_seconds"] = time.perf_counter() - start
        faiss_times, same = [], 0
        for query, ids in zip(query_set, torch_ids):
            ms, (_, faiss_ids) = timed(lambda q=query: index.search(q, k=10, backend="faiss"), 1)
            faiss_times.append(ms)
            same += int(torch.equal(faiss_ids, ids))
        result["faiss_ms"] = statistics.median(faiss_times)
        batch_ms, _ = timed(lambda: index.search(query_set, k=10, backend="faiss"), 3)
        result["faiss_batch_ms_per_query"] = batch_ms / queries
        result["faiss_same_hits"] = f"{same}/{queries}"
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000, help="images embedded for the throughput")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="stored vectors")
    parser.add_argument("--dim", type=int, default=256, help="dimension of the stored vectors")
    parser.add_argument("--queries", type=int, default=20, help="queries per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", help="also write the results as JSON here")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        workdir = Path(tmp)
        embed = embedding_throughput(options.num_images, options.batch_size, workdir)
        searches = [search_latency(rows, options.dim, options.queries, workdir) for rows in options.sizes]
    print(
        f"Embedding ({embed['images']} 32x32 PNG images, SimLAP ResNet-18 deep stem os8, batch "
        f"{options.batch_size}, {torch.get_num_threads()} torch threads): {embed['images_per_second']:.1f} "
        f"images/s\n"
    )
    has_faiss = "faiss_ms" in searches[0]
    header = [
        "stored vectors",
        "torch exact ms/query",
        f"torch ms/query (batch of {options.queries})",
        "pair-conditioned ms/query",
    ]
    if has_faiss:
        header += ["faiss flat ms/query", "faiss ms/query (batch)", "same top-10 as torch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in searches:
        row = [
            f"{result['rows']:,} x {result['dim']}",
            f"{result['torch_ms']:.1f}",
            f"{result['torch_batch_ms_per_query']:.2f}",
            f"{result['pair_ms']:.1f}",
        ]
        if has_faiss:
            row += [f"{result['faiss_ms']:.1f}", f"{result['faiss_batch_ms_per_query']:.2f}", result["faiss_same_hits"]]
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    if options.output:
        Path(options.output).write_text(
            json.dumps(
                {
                    "embedding": embed,
                    "search": searches,
                    "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
