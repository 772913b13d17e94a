"""Tests of simlap_hf.evaluation and the local evaluate metric modules (offline, CPU, a few seconds)."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import BaseModelOutputWithPooling

from simlap_hf.evaluation import (
    AVAILABLE_METRICS,
    classification_metrics,
    collapse_report,
    dims_for_variance,
    effective_rank,
    evaluate_representation,
    extract_features,
    knn_accuracy,
    knn_classify,
    linear_probe,
    load_metric,
    metric_path,
    normalized_embedding_std,
    singular_values,
    top_k_accuracy,
    top_k_hits,
)

# --------------------------------------------------------------------------------------------------------------
# Collapse measures
# --------------------------------------------------------------------------------------------------------------


def _numpy_dims_for_variance(z: np.ndarray, fraction: float) -> int:
    """Reference: eigenvalues of the sample covariance, largest first, counted until their share reaches fraction."""
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    share = np.cumsum(eigenvalues) / eigenvalues.sum()
    return int(np.argmax(share >= fraction)) + 1


def test_effective_rank_of_isotropic_gaussian_is_close_to_dimension():
    # N >> d: all singular values are sqrt(N) * (1 +- O(sqrt(d / N))), so exp(entropy) is just below d.
    d = 16
    z = torch.randn(20_000, d, generator=torch.Generator().manual_seed(0))
    rank = effective_rank(z)
    assert rank <= d + 1e-9
    assert abs(rank - d) / d < 0.05  # tolerance: 5 %


def test_effective_rank_of_rank_one_data_is_one():
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(32, generator=gen)
    z = torch.randn(500, 1, generator=gen) * direction + 3.0  # rank one after centring
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-3)
    assert dims_for_variance(z, 0.99) == 1


def test_singular_values_and_dims_for_variance_agree_with_numpy():
    rng = np.random.default_rng(2)
    scales = np.geomspace(10.0, 0.01, num=24)
    z = rng.standard_normal((3_000, 24)) * scales + rng.standard_normal(24)

    spectrum = singular_values(z)
    assert spectrum.shape == (24,)
    assert torch.all(spectrum[:-1] >= spectrum[1:])  # descending
    reference = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(spectrum.numpy(), reference, rtol=1e-10)
    cov_eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    np.testing.assert_allclose(spectrum.numpy() ** 2 / (z.shape[0] - 1), cov_eigenvalues, rtol=1e-8)

    for fraction in (0.5, 0.9, 0.99, 0.999):
        assert dims_for_variance(z, fraction) == _numpy_dims_for_variance(z, fraction)
    assert dims_for_variance(z, 1.0) == 24


def test_singular_values_shape_when_fewer_samples_than_dimensions():
    z = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    assert singular_values(z).shape == (5,)
    assert effective_rank(z) <= 4 + 1e-9  # centring removes one dimension


def test_normalized_embedding_std_isotropic_and_collapsed():
    gen = torch.Generator().manual_seed(4)
    k = 64
    isotropic = torch.randn(5_000, k, generator=gen)
    assert normalized_embedding_std(isotropic) == pytest.approx(1 / math.sqrt(k), rel=0.05)  # tolerance: 5 %

    direction = torch.randn(k, generator=gen)
    collapsed = direction + 1e-6 * torch.randn(5_000, k, generator=gen)
    assert normalized_embedding_std(collapsed) < 1e-4
    # Positive rescaling of each sample does not change the normalised embeddings.
    scaled = torch.rand(5_000, 1, generator=gen) * 10 + 0.1
    assert normalized_embedding_std(scaled * direction) < 1e-6


def test_collapse_report_contents_and_point_collapse():
    z = torch.randn(1_000, 8, generator=torch.Generator().manual_seed(5))
    report = collapse_report(z, fraction=0.9)
    json.dumps(report)  # serialisable
    assert report["num_samples"] == 1_000 and report["dim"] == 8
    assert report["effective_rank"] == pytest.approx(effective_rank(z))
    assert report["dims_for_variance"] == dims_for_variance(z, 0.9)
    assert report["normalized_embedding_std"] == pytest.approx(normalized_embedding_std(z))
    assert report["uniform_std"] == pytest.approx(1 / math.sqrt(8))
    assert report["singular_values"] == pytest.approx(singular_values(z).tolist())

    point = torch.ones(10, 8)  # complete collapse: no variance at all
    assert effective_rank(point) == 0.0
    assert dims_for_variance(point) == 0
    assert normalized_embedding_std(point) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        dims_for_variance(z, 0.0)


# --------------------------------------------------------------------------------------------------------------
# kNN and linear probe
# --------------------------------------------------------------------------------------------------------------


def _blobs(num_classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian blobs: class centres ~ N(0, 25 I), unit noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(labels.shape[0], dim, generator=gen)
    permutation = torch.randperm(labels.shape[0], generator=gen)
    return features[permutation], labels[permutation]


def _random_task(n: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(num_classes, (n,), generator=gen)


# float32 unit roundoff.
U32 = 2.0**-24


def knn_rtol(dim: int, k: int, temperature: float) -> float:
    """Relative tolerance between two float32 evaluations of the kNN class scores that differ only in rounding.

    A cosine of unit vectors in D dimensions is computed with an error of at most about D * u whatever the
    summation order (the blocking of the matmul changes with the number of queries in a chunk), so two evaluations
    differ by up to 2 * D * u; the weight exp(s / T) turns that into a relative difference of 2 * D * u / T.
    Normalising before or after the dot product adds a few u, and summing k positive weights in a different order
    at most 2 * (k - 1) * u. Valid when both evaluations pick the same neighbours (the callers check the margin at
    the k-th neighbour).
    """
    return (2 * dim / temperature + 2 * k + 8) * U32


def direct_knn_scores(train, train_labels, queries, num_classes, k, temperature):
    """The definition, one query at a time, in float64: ties at the k-th similarity go to the lower train index."""
    train64 = nn.functional.normalize(train.double(), dim=1)
    queries64 = nn.functional.normalize(queries.double(), dim=1)
    expected = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    for i, query in enumerate(queries64):
        sims = (train64 @ query).tolist()
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))  # largest first, then lower index
        for j in order[:k]:
            expected[i, train_labels[j]] += math.exp(sims[j] / temperature)
    return expected


def kth_margin(train, queries, k):
    """Smallest gap between the k-th and (k+1)-th cosine over the queries (float64)."""
    sims = nn.functional.normalize(queries.double(), dim=1) @ nn.functional.normalize(train.double(), dim=1).T
    top = sims.topk(k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k]).min().item()


def test_knn_classify_matches_definition_and_batching():
    gen = torch.Generator().manual_seed(6)
    train, train_labels = torch.randn(50, 8, generator=gen), torch.randint(4, (50,), generator=gen)
    queries = torch.randn(7, 8, generator=gen)
    k, temperature = 5, 0.1
    rtol = knn_rtol(dim=8, k=k, temperature=temperature)  # 1.0e-5
    assert kth_margin(train, queries, k) > 1e-4  # far above the rounding of a cosine: same neighbours everywhere

    expected = direct_knn_scores(train, train_labels, queries, 4, k, temperature).float()
    scores = knn_classify(train, train_labels, queries, num_classes=4, knn_k=k, knn_temperature=temperature)
    assert scores.shape == (7, 4) and scores.dtype == torch.float32
    # Classes without a neighbour score exactly 0 in both, so no absolute tolerance is needed.
    torch.testing.assert_close(scores, expected, rtol=rtol, atol=0.0)
    for batch_size in (1, 2, 7):  # chunks of queries: the matmul blocking changes, the neighbours do not
        chunked = knn_classify(
            train, train_labels, queries, num_classes=4, knn_k=k, knn_temperature=temperature, batch_size=batch_size
        )
        torch.testing.assert_close(chunked, scores, rtol=rtol, atol=0.0)
    # A bound on the similarity block gives the same chunks as the explicit batch size.
    bounded = knn_classify(
        train, train_labels, queries, num_classes=4, knn_k=k, knn_temperature=temperature, max_block_elements=2 * 50
    )
    torch.testing.assert_close(bounded, scores, rtol=rtol, atol=0.0)

    # k > N is clamped to N: every train sample votes.
    all_votes = knn_classify(train[:3], train_labels[:3], queries, num_classes=4, knn_k=100, knn_temperature=0.1)
    torch.testing.assert_close(
        all_votes,
        knn_classify(train[:3], train_labels[:3], queries, num_classes=4, knn_k=3, knn_temperature=0.1),
        rtol=rtol,
        atol=0.0,
    )
    assert torch.all((all_votes > 0).sum(dim=1) == train_labels[:3].unique().numel())


def test_knn_classify_ties_go_to_the_lower_train_index_in_any_chunking():
    # Vectors of +-1 in 16 dimensions all have norm 4, so every cosine is a multiple of 1/16 and is computed exactly
    # in float32 whatever the summation order: ties are real, and the scores must match the definition exactly
    # up to the order in which k positive weights are summed (at most 2 * (k - 1) * u relative).
    gen = torch.Generator().manual_seed(13)
    base = torch.randint(0, 2, (12, 16), generator=gen).float() * 2 - 1
    train = torch.cat([base, base, base[:5]])  # duplicates: equal cosines with different labels
    train_labels = torch.randint(0, 5, (train.shape[0],), generator=gen)
    queries = torch.cat([base[:4], torch.randint(0, 2, (6, 16), generator=gen).float() * 2 - 1])
    k, temperature = 7, 0.5
    expected = direct_knn_scores(train, train_labels, queries, 5, k, temperature).float()
    sims = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(train, dim=1).T
    top = sims.topk(k + 1, dim=1).values
    assert (top[:, k - 1] == top[:, k]).sum() >= 5  # most queries have a tie across the k-th neighbour
    for batch_size in (None, 1, 3):
        scores = knn_classify(
            train, train_labels, queries, num_classes=5, knn_k=k, knn_temperature=temperature, batch_size=batch_size
        )
        torch.testing.assert_close(scores, expected, rtol=2 * k * U32, atol=0.0)


def test_knn_and_linear_probe_are_perfect_on_separable_blobs():
    train, train_labels = _blobs(num_classes=5, per_class=80, dim=32, seed=7)
    test, test_labels = _blobs(num_classes=5, per_class=40, dim=32, seed=8)

    assert knn_accuracy(train, train_labels, test, test_labels, num_classes=5) == 100.0
    assert knn_accuracy(train, train_labels, test, test_labels, num_classes=5, knn_k=1000) == 100.0  # k clamped to N

    result = linear_probe(train, train_labels, test, test_labels, Cs=(0.01, 0.1, 1.0), seed=0)
    assert result["top1"] == 100.0
    assert result["val_top1"] == 100.0
    assert result["C"] in (0.01, 0.1, 1.0)


def test_knn_and_linear_probe_are_at_chance_on_random_labels():
    # 2,000 test queries: the standard error of an accuracy near 25 % is about 1 point; tolerance: 4 points.
    num_classes = 4
    train, train_labels = _random_task(2_000, num_classes, dim=16, seed=9)
    test, test_labels = _random_task(2_000, num_classes, dim=16, seed=10)
    chance = 100.0 / num_classes

    assert abs(knn_accuracy(train, train_labels, test, test_labels, num_classes=num_classes) - chance) < 4.0
    result = linear_probe(train, train_labels, test, test_labels, Cs=(0.01, 1.0), seed=0)
    assert abs(result["top1"] - chance) < 4.0
    assert abs(result["val_top1"] - chance) < 6.0  # 400 validation samples


def test_linear_probe_single_C_and_numpy_inputs():
    train, train_labels = _blobs(num_classes=3, per_class=30, dim=8, seed=11)
    test, test_labels = _blobs(num_classes=3, per_class=10, dim=8, seed=12)
    result = linear_probe(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), Cs=(1.0,))
    assert result["top1"] == 100.0 and result["C"] == 1.0 and math.isnan(result["val_top1"])


# --------------------------------------------------------------------------------------------------------------
# Metric modules
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Offline mode for the Hub and evaluate, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_metric_modules_are_shipped():
    for name in AVAILABLE_METRICS:
        assert (metric_path(name) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


def test_accuracy_metric_offline(offline):
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 2, 2, 1], references=[0, 1, 1, 2, 0]) == {"accuracy": 0.6}
    assert metric.compute(predictions=[3, 3], references=[3, 3]) == {"accuracy": 1.0}  # reusable after compute
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_top_k_accuracy_metric_offline(offline):
    metric = load_metric("top_k_accuracy")
    scores = [
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 0
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # label 0: rank 6 (lowest score)
        [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4: rank 4
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 5: all tied, lower index first -> rank 5
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0, 0.0],  # label 2: rank 1
    ]
    labels = [0, 0, 4, 5, 2]
    assert metric.compute(predictions=scores, references=labels, k=1) == {"top_k_accuracy": 0.2}
    assert metric.compute(predictions=scores, references=labels, k=2) == {"top_k_accuracy": 0.4}
    assert metric.compute(predictions=scores, references=labels) == {"top_k_accuracy": 0.6}  # default k=5
    assert metric.compute(predictions=scores, references=labels, k=6) == {"top_k_accuracy": 0.8}
    assert metric.compute(predictions=scores, references=labels, k=50) == {"top_k_accuracy": 1.0}  # clamped to 7
    # k=1 equals the accuracy of argmax predictions, ties included.
    argmax = np.asarray(scores).argmax(axis=1)
    assert load_metric("accuracy").compute(predictions=argmax, references=labels) == {"accuracy": 0.2}


def test_the_evaluate_metric_modules_agree_with_top_k_accuracy(offline):
    """The metric modules are single files for ``evaluate.load`` and carry their own copy of the rank rule."""
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (400, 9), generator=generator).float()  # many ties
    labels = torch.randint(0, 9, (400,), generator=generator)
    top_k = load_metric("top_k_accuracy")
    for k in (1, 2, 5, 9, 20):
        expected = top_k.compute(predictions=scores.numpy(), references=labels.numpy(), k=k)["top_k_accuracy"]
        assert top_k_accuracy(scores, labels, k) == pytest.approx(expected, abs=1e-12)
    argmax = scores.argmax(dim=1).numpy()
    accuracy = load_metric("accuracy").compute(predictions=argmax, references=labels.numpy())["accuracy"]
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(accuracy, abs=1e-12)
    assert classification_metrics(scores, labels)["top5"] == pytest.approx(100.0 * top_k_accuracy(scores, labels, 5))
    outside = top_k_hits(scores[:3], torch.tensor([0, -1, 9]), 9)  # a class outside [0, C) is never a hit
    assert outside.tolist() == [True, False, False]


def test_classification_metrics_agree_with_torch(offline):
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(300, 10, generator=gen)
    labels = torch.randint(10, (300,), generator=gen)
    labels[:100] = logits[:100].argmax(dim=1)  # well above chance

    result = classification_metrics(logits, labels)
    top1 = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
    top5 = 100.0 * (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)
    assert result["top1"] > 33.0

    few = classification_metrics(logits[:, :3], labels % 3)  # fewer than 5 classes: top-5 is clamped to top-3
    assert few["top5"] == 100.0


# --------------------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    """Sample i is a 3x4x4 image whose channel c is constant i + c / 10; its label is i % 3."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixel_values = (i + torch.arange(3.0) / 10)[:, None, None].expand(3, 4, 4).clone()
        return {"pixel_values": pixel_values, "labels": torch.tensor(i % 3)}


def _expected(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(n, dtype=torch.float32)[:, None]
    return 2 * (index + torch.arange(3.0) / 10), torch.arange(n) % 3


class _TinyEncoder(nn.Module):
    """transformers-style model: ``forward(pixel_values)`` returns a ModelOutput; pooler = 2 * spatial mean."""

    def __init__(self, pooler_shape_4d: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.dropout = nn.Dropout(0.5)  # would corrupt the features if the model stayed in train mode
        self.frozen = nn.BatchNorm2d(3)
        self.pooler_shape_4d = pooler_shape_4d
        self.modes_seen: list[bool] = []

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None):
        self.modes_seen.append(self.training)
        hidden = self.dropout(pixel_values * self.scale)
        pooled = hidden.mean(dim=(2, 3), keepdim=self.pooler_shape_4d)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def test_extract_features_from_model_output_in_order():
    model = _TinyEncoder()
    model.train()
    model.frozen.eval()  # a submodule deliberately in eval mode must stay so
    loader = DataLoader(_ImageDataset(10), batch_size=4, shuffle=False)  # uneven last batch

    features, labels = extract_features(model, loader, show_progress=False)
    expected_features, expected_labels = _expected(10)
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    assert features.device.type == "cpu" and labels.device.type == "cpu"
    torch.testing.assert_close(features, expected_features)
    assert torch.equal(labels, expected_labels)
    assert model.modes_seen == [False, False, False]
    assert model.training and model.dropout.training and not model.frozen.training
    assert torch.is_grad_enabled()


def test_extract_features_output_key_and_flattening():
    loader = DataLoader(_ImageDataset(5), batch_size=2)
    features, _ = extract_features(_TinyEncoder(pooler_shape_4d=True), loader, show_progress=False)
    torch.testing.assert_close(features, _expected(5)[0])  # (B, D, 1, 1) pooler flattened to (B, D)

    hidden, labels = extract_features(_TinyEncoder(), loader, output_key="last_hidden_state", show_progress=False)
    assert hidden.shape == (5, 3 * 4 * 4) and labels.shape == (5,)
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        extract_features(_TinyEncoder(), loader, output_key="missing", show_progress=False)


def test_extract_features_from_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)  # forward returns pooled features
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    loader = DataLoader(
        [{"pixel_values": images[i], "labels": torch.tensor(i)} for i in range(2)], batch_size=1
    )  # one sample per batch: batch-norm must use its running statistics (eval mode)

    features, labels = extract_features(model, loader, show_progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        reference = model(images)
    assert features.shape == (2, model.num_features) == reference.shape
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0, 1]


def test_extract_features_from_transformers_resnet():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    loader = DataLoader([{"pixel_values": images[i], "labels": i} for i in range(5)], batch_size=2)

    features, labels = extract_features(model, loader, show_progress=False)
    model.eval()
    with torch.no_grad():
        reference = model(pixel_values=images).pooler_output  # (5, 16, 1, 1)
    torch.testing.assert_close(features, reference.flatten(1), rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0, 1, 2, 3, 4]


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_extract_features_with_accelerator(fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, loader = accelerator.prepare(_TinyEncoder(), DataLoader(_ImageDataset(7), batch_size=3))
    features, labels = extract_features(model, loader, accelerator=accelerator, show_progress=False)
    expected_features, expected_labels = _expected(7)
    torch.testing.assert_close(features, expected_features)
    assert torch.equal(labels, expected_labels)
    # One process: the shard is everything, on the device.
    shard, shard_labels = extract_features(model, loader, accelerator=accelerator, show_progress=False, shard=True)
    torch.testing.assert_close(shard, expected_features)
    assert torch.equal(shard_labels, expected_labels) and shard.device == accelerator.device


def _two_process_extraction(n: int) -> None:
    """Run in each of two processes: each must end with the full, de-duplicated feature set in dataset order."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    model, loader = accelerator.prepare(_TinyEncoder(), DataLoader(_ImageDataset(n), batch_size=2))
    features, labels = extract_features(model, loader, accelerator=accelerator, show_progress=False)
    expected_features, expected_labels = _expected(n)
    torch.testing.assert_close(features, expected_features)
    assert torch.equal(labels, expected_labels)

    # Sharded: each process keeps its share of every gathered batch; together they hold every sample once.
    shard, shard_labels = extract_features(model, loader, accelerator=accelerator, show_progress=False, shard=True)
    shards = [None, None]
    torch.distributed.all_gather_object(shards, (shard, shard_labels))
    assert 0 < shard.shape[0] < n
    union = torch.cat([part[0] for part in shards])
    order = union[:, 0].argsort()  # feature column 0 is 2 * sample index
    torch.testing.assert_close(union[order], expected_features)
    assert torch.equal(torch.cat([part[1] for part in shards])[order], expected_labels)


def test_extract_features_gathers_across_processes(fresh_accelerate_state):
    from accelerate import debug_launcher

    # 7 samples, 2 processes, batches of 2: the last round is padded with a duplicated sample that must be dropped.
    debug_launcher(_two_process_extraction, args=(7,), num_processes=2)


# --------------------------------------------------------------------------------------------------------------
# Representation evaluation of a pretraining model
# --------------------------------------------------------------------------------------------------------------


class _TinyPretrainer(_TinyEncoder):
    """_TinyEncoder with the online linear head of a pretraining model (features (B, 3) -> logits (B, 3))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.online_head = nn.Linear(3, 3)


def _expected_representation(model: _TinyPretrainer, validation: DataLoader, train: DataLoader) -> dict:
    val_features, val_labels = extract_features(model, validation, show_progress=False)
    train_features, train_labels = extract_features(model, train, show_progress=False)
    with torch.no_grad():
        logits = model.online_head(val_features)
    metrics = classification_metrics(logits, val_labels)
    knn = knn_accuracy(train_features, train_labels, val_features, val_labels, 3, knn_k=3, knn_temperature=0.5)
    return {"eval_top1": metrics["top1"], "eval_top5": metrics["top5"], "eval_knn_top1": knn}


def test_evaluate_representation_is_head_metrics_and_knn(offline):
    model = _TinyPretrainer()
    model.train()
    validation, train = DataLoader(_ImageDataset(7), batch_size=3), DataLoader(_ImageDataset(11), batch_size=4)
    result = evaluate_representation(model, validation, train, None, num_classes=3, knn_k=3, knn_temperature=0.5)
    assert model.training  # train/eval flags restored
    assert result == _expected_representation(model, validation, train)
    assert set(result) == {"eval_top1", "eval_top5", "eval_knn_top1"} and result["eval_top5"] == 100.0


def test_evaluate_representation_with_accelerator(offline, fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    plain = _TinyPretrainer()
    model, validation, train = accelerator.prepare(
        _TinyPretrainer(), DataLoader(_ImageDataset(7), batch_size=3), DataLoader(_ImageDataset(11), batch_size=4)
    )
    result = evaluate_representation(model, validation, train, accelerator, num_classes=3, knn_k=3, knn_temperature=0.5)
    expected = _expected_representation(plain, DataLoader(_ImageDataset(7)), DataLoader(_ImageDataset(11)))
    assert result == expected
