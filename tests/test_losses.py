"""The SimLAP loss against direct evaluations of its definition (the multi-positive InfoNCE over gated cosines of
the paper), and the package's one classification loss."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from simlap_hf.losses import (
    arcgrad_logits,
    classification_loss,
    gate_entropy,
    gated_cosine,
    sample_pair_labels,
    simlap_contrastive_terms,
    simlap_loss,
)

TEMPERATURE = 0.1


def naive_simlap_loss(z, y1, y2, gates, temperature, keys=None, key_labels=None):
    """The definition written out: a materialised B x N x K gated tensor and a loop over positive pairs."""
    if keys is None:
        keys, key_labels = z, y1
    z, keys, gates = z.double(), keys.double(), gates.double()
    gated_anchor = gates * z  # (B, K)
    gated_keys = gates[:, None, :] * keys[None, :, :]  # (B, N, K)
    cos = F.cosine_similarity(gated_anchor[:, None, :], gated_keys, dim=-1, eps=1e-12)  # (B, N)
    logits = cos / temperature
    terms = []
    for b in range(z.shape[0]):
        negatives = [n for n in range(keys.shape[0]) if key_labels[n] != y1[b] and key_labels[n] != y2[b]]
        for p in range(keys.shape[0]):
            if key_labels[p] != y2[b]:
                continue
            denominator = torch.exp(logits[b, p]) + sum((torch.exp(logits[b, n]) for n in negatives), 0.0)
            terms.append(torch.log(denominator) - logits[b, p])
    if not terms:
        return (z.sum() + gates.sum()) * 0.0
    return torch.stack(terms).mean()


def make_gates(kind, y1, y2, num_classes, dim, generator):
    if kind == "open":
        return torch.ones(y1.shape[0], dim, dtype=torch.float64)
    table = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    if kind == "fused":
        return torch.sigmoid((table[y1] + table[y2]) / 2)
    return torch.sigmoid(table[y1]) * torch.sigmoid(table[y2])


def batches():
    """(name, labels, num_classes): repeated samples, a single class, a class that never occurs."""
    yield "repeated", torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 1]), 5
    yield "one_class", torch.tensor([2, 2, 2, 2, 2, 2]), 4
    yield "absent", torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), 6


@pytest.mark.parametrize("pair_mode", ["arbitrary", "identical", "distinct"])
@pytest.mark.parametrize("gate_kind", ["fused", "product", "open"])
def test_loss_equals_naive_definition(pair_mode, gate_kind):
    generator = torch.Generator().manual_seed(0)
    for name, y1, num_classes in batches():
        y2 = sample_pair_labels(y1, pair_mode, num_classes, generator=generator)
        z = torch.randn(y1.shape[0], 16, generator=generator, dtype=torch.float64)
        gates = make_gates(gate_kind, y1, y2, num_classes, 16, generator).requires_grad_(True)
        z_ours = z.clone().requires_grad_(True)
        z_naive = z.clone().requires_grad_(True)
        gates_naive = gates.detach().clone().requires_grad_(True)
        ours = simlap_loss(z_ours, y1, y2, gates, TEMPERATURE)
        naive = naive_simlap_loss(z_naive, y1, y2, gates_naive, TEMPERATURE)
        assert torch.isfinite(ours), name
        assert ours.item() == pytest.approx(naive.item(), abs=1e-5, rel=1e-5), name
        ours.backward()
        naive.backward()
        assert torch.isfinite(z_ours.grad).all() and torch.isfinite(gates.grad).all(), name
        torch.testing.assert_close(z_ours.grad.double(), z_naive.grad, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(gates.grad.double(), gates_naive.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_distinct_pairs_without_partner_give_zero_and_finite_gradient():
    # y2 is a class absent from the batch for every anchor: no positives at all.
    y1 = torch.tensor([0, 0, 1, 1])
    y2 = torch.tensor([3, 3, 2, 2])
    z = torch.randn(4, 8, requires_grad=True)
    gates = torch.rand(4, 8, requires_grad=True)
    loss = simlap_loss(z, y1, y2, gates)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(z.grad).all() and torch.isfinite(gates.grad).all()


def test_single_class_batch_has_no_negatives_and_stays_finite():
    y = torch.zeros(6, dtype=torch.long)
    z = torch.randn(6, 8, requires_grad=True)
    loss = simlap_loss(z, y, y, torch.ones(6, 8))
    loss.backward()
    # Every positive pair is alone in its denominator: log(exp(l)) - l = 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(z.grad).all()


def supcon_loss(features, labels, temperature):
    """Supervised contrastive learning, multi-positive form: every sample of the anchor's class (the anchor
    included) is a positive, contrasted with the samples of the other classes."""
    normalised = F.normalize(features.double(), dim=1)
    similarity = normalised @ normalised.T / temperature
    same = labels[:, None] == labels[None, :]
    total, count = 0.0, 0
    for anchor, positive in zip(*torch.nonzero(same, as_tuple=True)):
        negatives = similarity[anchor][~same[anchor]]
        logits = torch.cat([similarity[anchor, positive].reshape(1), negatives])
        total = total - F.log_softmax(logits, dim=0)[0]
        count += 1
    return total / count


def test_open_gate_identical_pairs_is_supcon():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (24,), generator=generator)
    features = torch.randn(24, 32, generator=generator)
    ours = simlap_loss(features, labels, labels, torch.ones(24, 32), temperature=0.2)
    assert ours.item() == pytest.approx(supcon_loss(features, labels, 0.2).item(), abs=1e-5)


def test_explicit_keys_and_permutation_invariance():
    generator = torch.Generator().manual_seed(2)
    y1 = torch.randint(0, 5, (12,), generator=generator)
    y2 = sample_pair_labels(y1, "arbitrary", 5, generator=generator)
    z = torch.randn(12, 8, generator=generator)
    gates = torch.rand(12, 8, generator=generator)
    default = simlap_loss(z, y1, y2, gates)
    explicit = simlap_loss(z, y1, y2, gates, keys=z, key_labels=y1)
    order = torch.randperm(12, generator=generator)
    permuted = simlap_loss(z[order], y1[order], y2[order], gates[order])
    assert default.item() == pytest.approx(explicit.item(), abs=1e-6)
    assert default.item() == pytest.approx(permuted.item(), abs=1e-5)


def test_keys_without_labels_is_an_error():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="key_labels"):
        simlap_loss(z, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.ones(4, 8), keys=z)


def test_gated_cosine_is_float32_under_autocast_and_bounded():
    z = torch.randn(6, 8, dtype=torch.bfloat16)
    gates = torch.rand(6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosine = gated_cosine(z, z, gates)
    assert cosine.dtype == torch.float32
    assert cosine.abs().max() <= 1.0 + 1e-5


def test_zero_gate_is_finite():
    z = torch.randn(3, 4, requires_grad=True)
    gates = torch.zeros(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    loss = simlap_loss(z, labels, labels, gates)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(gates.grad).all()


def test_pair_sampling_modes():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 7, (50,), generator=generator)
    arbitrary = sample_pair_labels(labels, "arbitrary", 7, generator=generator)
    assert sorted(arbitrary.tolist()) == sorted(labels.tolist())  # a permutation: every y2 is in the batch
    assert torch.equal(sample_pair_labels(labels, "identical", 7), labels)
    distinct = sample_pair_labels(labels, "distinct", 7, generator=generator)
    assert (distinct != labels).all() and distinct.min() >= 0 and distinct.max() < 7
    with pytest.raises(ValueError, match="pair_mode='random'.*arbitrary, identical, distinct"):
        sample_pair_labels(labels, "random", 7)
    with pytest.raises(ValueError, match="at least 2 classes"):
        sample_pair_labels(torch.zeros(3, dtype=torch.long), "distinct", 1)


def test_gate_entropy_values():
    assert gate_entropy(torch.full((2, 3), 0.5)).item() == pytest.approx(math.log(2), abs=1e-6)
    assert gate_entropy(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_arcgrad_is_finite_at_exact_plus_minus_one(dtype):
    cosine = torch.tensor([[1.0, -1.0, 0.0], [0.5, 1.0, -1.0]], dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = arcgrad_logits(cosine, scale=10.0)
        loss = F.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    assert logits.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(cosine.grad).all()
    assert logits[0, 0].item() == pytest.approx(10 * math.pi, abs=2e-2)
    assert logits[0, 1].item() == pytest.approx(0.0, abs=2e-2)


def test_terms_count_positive_pairs():
    y1 = torch.tensor([0, 0, 1])
    y2 = torch.tensor([1, 0, 0])
    terms = simlap_contrastive_terms(torch.randn(3, 4), y1, y2, torch.ones(3, 4))
    # anchor 0 -> class 1 (1 key), anchor 1 -> class 0 (2 keys, itself included), anchor 2 -> class 0 (2 keys)
    assert terms.num_positives.item() == 5
    expected_negative = torch.tensor([[False, False, False], [False, False, True], [False, False, False]])
    assert torch.equal(terms.negative, expected_negative)
    assert list(itertools.chain.from_iterable(terms.positive.tolist())) == [
        False,
        False,
        True,
        True,
        True,
        False,
        True,
        True,
        False,
    ]


def test_classification_loss_smooths_class_indices_only_and_is_float32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=generator), torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = F.one_hot(labels, 5) * 0.8 + 0.2 / 5
    expected = -(smoothed * F.log_softmax(logits, dim=1)).sum(1).mean()
    torch.testing.assert_close(classification_loss(logits, labels, 0.2), expected)
    # Soft targets are used as given: their smoothing is not applied again.
    torch.testing.assert_close(classification_loss(logits, smoothed, 0.2), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert classification_loss(logits.bfloat16(), labels, 0.2).dtype == torch.float32
