"""The options of the authors' later SimLAP formulation (erow/FastSSL ``model/simlap.py``, SPEC section 3b) against an
independent float64 evaluation of that formulation: materialised logits, their loss written as they compute it (a
row-mean shift, exponentials, a masked sum of negatives), their gates and projector; values and gradients to 1e-6.
Also: deterministic gates in evaluation mode (and in relations and the gate analysis), the reference form unchanged,
configuration errors, the flags of train_pretrain.py, and two processes equal to one process with the whole batch.

The two-process test starts ``torchrun --nproc_per_node 2 tests/test_fastssl_form.py OUTPUT_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # a torchrun worker: this checkout's package, not an installed one
    sys.path.insert(0, str(ROOT))
else:
    from conftest import tiny_config, two_process_command, write_idx

from simlap_hf import SimLAPModel  # noqa: E402
from simlap_hf.data import FASHION_MNIST_LABEL_NAMES  # noqa: E402
from simlap_hf.losses import sample_pair_labels, simlap_contrastive_terms, simlap_loss  # noqa: E402
from simlap_hf.modeling_simlap import gumbel_gate, stochastic_gate  # noqa: E402

TOLERANCE = 1e-6  # float64 throughout: both sides agree to about 1e-14; a wrong term is O(0.01) or more


# ----------------------------------------------------------------------------------------------------------------
# The authors' formulation, written out independently (materialised, float64)
# ----------------------------------------------------------------------------------------------------------------


def authors_logits(z1, k2, gates, scale, alpha=None, form="dot"):
    """(B, N) logits. ``dot``: ``<z1n * g * g, k2n> * s``; ``cosine``: the vitookit form, each anchor's gate applied
    to a B x N x K copy of the keys and both renormalised. With ``alpha``: minus ``alpha * <z1n, k2n> * s``."""
    z1n, k2n = F.normalize(z1, dim=-1), F.normalize(k2, dim=-1)
    if form == "dot":
        logits = torch.einsum("bk,nk->bn", z1n * gates * gates, k2n) * scale
    else:
        gated_anchor = F.normalize(z1 * gates, dim=-1)  # (B, K)
        gated_keys = F.normalize(torch.einsum("nk,bk->bnk", k2, gates), dim=-1)  # (B, N, K)
        logits = torch.einsum("bk,bnk->bn", gated_anchor, gated_keys) * scale
    if alpha is not None:
        logits = logits - alpha * torch.einsum("bk,nk->bn", z1n, k2n) * scale
    return logits


def authors_multipositive_loss(logits, positive, excluded, per_anchor=True):
    """Their multi-positive cross-entropy: row-mean shift (detached), exp, the sum of the scores of the keys that are
    not excluded, ``log(score_p + negatives) - logit_p`` per positive; per anchor divided by its positive count +
    1e-6 and averaged over anchors, or (the reference normalisation) one mean over all positive pairs."""
    logits = logits - logits.mean(dim=1, keepdim=True).detach()
    scores = logits.exp()
    negatives = (scores * (~excluded)).sum(dim=1, keepdim=True)
    terms = positive * (torch.log(scores + negatives) - logits)  # (B, N)
    if per_anchor:
        return (terms.sum(dim=1) / (positive.sum(dim=1) + 1e-6)).mean()
    return terms.sum() / positive.sum().clamp_min(1)


def authors_loss(z1, k2, y1, y2, key_labels, gates, scale, alpha=None, form="dot", per_anchor=True):
    own = y1[:, None] == key_labels[None, :]
    partner = y2[:, None] == key_labels[None, :]
    logits = authors_logits(z1, k2, gates, scale, alpha, form)
    return authors_multipositive_loss(logits, partner, own | partner, per_anchor)


def authors_gate_logits(feature_filter, y1, y2):
    """Their BasicGate/GumbelGates/StochasticGate pre-activation: mlp of the mean of the two label embeddings, with
    the layers ReLU, BatchNorm, Linear, ReLU, BatchNorm, Linear applied one by one."""
    x = (feature_filter.label_embedding.weight[y1] + feature_filter.label_embedding.weight[y2]) / 2
    relu1, norm1, linear1, relu2, norm2, linear2 = feature_filter.mlp
    for layer in (relu1, norm1, linear1, relu2, norm2, linear2):
        x = layer(x)
    return x


def random_inputs(seed, batch=10, keys=None, dim=12, classes=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    pair_labels = sample_pair_labels(labels, "arbitrary", classes, generator=generator)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    gates = torch.rand(batch, dim, generator=generator, dtype=torch.float64)
    return z, labels, pair_labels, gates


def assert_close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=TOLERANCE, msg=what)


# ----------------------------------------------------------------------------------------------------------------
# Loss options: value and gradient
# ----------------------------------------------------------------------------------------------------------------

OPTION_SETS = {
    "gated dot": dict(form="dot"),
    "learnable temperature": dict(form="cosine", learnable=True),
    "alpha": dict(form="cosine", alpha=0.5),
    "per-anchor normalisation": dict(form="cosine", per_anchor=True),
    "full form": dict(form="dot", learnable=True, alpha=0.5, per_anchor=True),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_loss_option_matches_the_authors_formulation(name, seed):
    option = OPTION_SETS[name]
    form, per_anchor = option["form"], option.get("per_anchor", False)
    z, labels, pair_labels, gates = random_inputs(seed)
    temperature = 0.1
    parameters = {}
    for side in ("ours", "theirs"):
        values = {
            "z": z.clone().requires_grad_(True),
            "gates": gates.clone().requires_grad_(True),
            "scale_logit": torch.tensor(math.log(1 / temperature), dtype=torch.float64, requires_grad=True),
            "alpha": torch.tensor(option.get("alpha", 0.0), dtype=torch.float64, requires_grad=True),
        }
        parameters[side] = values
    ours, theirs = parameters["ours"], parameters["theirs"]
    learnable, alpha = option.get("learnable", False), "alpha" in option
    loss = simlap_loss(
        ours["z"],
        labels,
        pair_labels,
        ours["gates"],
        temperature,
        form=form,
        logit_scale=ours["scale_logit"].exp() if learnable else None,
        alpha=ours["alpha"] if alpha else None,
        positive_normalization="anchor" if per_anchor else "batch",
    )
    scale = theirs["scale_logit"].exp() if learnable else 1 / temperature
    reference = authors_loss(
        theirs["z"],
        theirs["z"],
        labels,
        pair_labels,
        labels,
        theirs["gates"],
        scale,
        theirs["alpha"] if alpha else None,
        form=form,
        per_anchor=per_anchor,
    )
    assert loss.dtype == torch.float64
    assert_close(loss, reference, f"{name}: loss")
    loss.backward()
    reference.backward()
    checked = ["z", "gates"] + (["scale_logit"] if learnable else []) + (["alpha"] if alpha else [])
    for key in checked:
        assert theirs[key].grad is not None and theirs[key].grad.abs().max() > 0, key
        assert_close(ours[key].grad, theirs[key].grad, f"{name}: gradient of {key}")


def test_per_anchor_normalisation_with_anchors_without_positives():
    """Distinct partners absent from the batch: those anchors count as 0 in the mean over all anchors (their +1e-6)."""
    z, _, _, gates = random_inputs(3, batch=8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    pair_labels = torch.tensor([1, 3, 0, 3, 0, 3, 2, 2])  # class 3 is absent
    ours = simlap_loss(z, labels, pair_labels, gates, 0.1, form="dot", positive_normalization="anchor")
    theirs = authors_loss(z, z, labels, pair_labels, labels, gates, 10.0, form="dot", per_anchor=True)
    assert_close(ours, theirs, "absent partners")
    batch = simlap_loss(z, labels, pair_labels, gates, 0.1, form="dot")
    assert not torch.isclose(ours, batch)  # the two normalisations differ here


def test_new_forms_use_explicit_keys_and_stay_float32_under_autocast():
    z, labels, pair_labels, gates = random_inputs(4, batch=6)
    keys, key_labels = torch.cat([z, z.flip(0)]), torch.cat([labels, labels.flip(0)])
    ours = simlap_loss(z, labels, pair_labels, gates, 0.2, keys=keys, key_labels=key_labels, form="dot", alpha=0.3)
    theirs = authors_loss(z, keys, labels, pair_labels, key_labels, gates, 5.0, alpha=0.3, form="dot", per_anchor=False)
    assert_close(ours, theirs, "explicit keys")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = simlap_contrastive_terms(
            z.bfloat16(),
            labels,
            pair_labels,
            gates.bfloat16(),
            logit_scale=torch.tensor(3.0),
            alpha=torch.tensor(0.5),
            form="dot",
            positive_normalization="anchor",
        )
    assert terms.loss_sum.dtype == torch.float32 and terms.cosine.dtype == torch.float32
    assert torch.isfinite(terms.loss_sum)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(form="product"), r"form='product' is not valid; choose one of cosine, dot"),
        (dict(positive_normalization="pair"), r"normalization='pair' is not valid; choose one of batch, anchor"),
    ],
)
def test_bad_loss_options_name_the_valid_values(options, message):
    z, labels, pair_labels, gates = random_inputs(0, batch=4)
    with pytest.raises(ValueError, match=message):
        simlap_loss(z, labels, pair_labels, gates, **options)


# ----------------------------------------------------------------------------------------------------------------
# Gates: their samplers in training, deterministic in evaluation
# ----------------------------------------------------------------------------------------------------------------


def double_filter(**options):
    model = SimLAPModel(tiny_config(**options)).double()
    return model, model.feature_filter


@pytest.mark.parametrize("straight_through", [False, True])
def test_gumbel_gate_matches_the_authors_sampler_in_training(straight_through):
    model, feature_filter = double_filter(
        gate="gumbel", gumbel_temperature=0.7, gumbel_straight_through=straight_through
    )
    feature_filter.train()
    y1, y2 = torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor([1, 1, 3, 0, 2, 2])
    weights = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(11)
    ours = gumbel_gate(feature_filter, y1, y2)
    ours_grad = torch.autograd.grad((ours * weights).sum(), feature_filter.label_embedding.weight)[0]
    torch.manual_seed(11)
    logits = authors_gate_logits(feature_filter, y1, y2)
    uniform = torch.rand_like(logits)
    soft = torch.sigmoid((logits + -torch.log(-torch.log(uniform + 1e-20) + 1e-20)) / 0.7)
    theirs = (torch.round(soft) - soft.detach() + soft) if straight_through else soft
    theirs_grad = torch.autograd.grad((theirs * weights).sum(), feature_filter.label_embedding.weight)[0]
    assert_close(ours, theirs, "gumbel gate")
    assert_close(ours_grad, theirs_grad, "gumbel gate gradient")
    if straight_through:
        assert set(ours.detach().unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(12)
    assert not torch.equal(gumbel_gate(feature_filter, y1, y2), ours)  # noise in training


def test_stochastic_gate_and_regulariser_match_the_authors_in_training():
    sigma, lam = 0.3, 0.2
    model, feature_filter = double_filter(gate="stochastic", stochastic_gate_sigma=sigma, stochastic_gate_lambda=lam)
    feature_filter.train()
    y1, y2 = torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor([1, 1, 3, 0, 2, 2])
    weights = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    gates, regulariser = stochastic_gate(feature_filter, y1, y2)
    ours_grad = torch.autograd.grad((gates * weights).sum() + regulariser, feature_filter.label_embedding.weight)[0]
    torch.manual_seed(5)
    mean = authors_gate_logits(feature_filter, y1, y2)
    noise = torch.randn_like(mean) * sigma
    theirs = torch.clamp(mean + noise + 0.5, 0.0, 1.0)
    theirs_regulariser = torch.mean(0.5 * (1 + torch.erf((mean + 0.5) / sigma / math.sqrt(2))))
    theirs_grad = torch.autograd.grad(
        (theirs * weights).sum() + theirs_regulariser, feature_filter.label_embedding.weight
    )[0]
    assert_close(gates, theirs, "stochastic gate")
    assert_close(regulariser, theirs_regulariser, "regulariser")
    assert_close(ours_grad, theirs_grad, "stochastic gate gradient")


def test_stochastic_regulariser_is_weighted_added_to_the_loss_and_logged():
    model = SimLAPModel(tiny_config(gate="stochastic", stochastic_gate_lambda=0.25)).train()
    pixels, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(0)
    out = model(pixels, labels=labels)
    parts = out.contrastive_loss + out.head_loss + out.gate_penalty_loss + out.gate_regularizer_loss
    torch.testing.assert_close(out.loss, parts)
    assert 0 < float(out.gate_regularizer_loss.detach()) <= 0.25  # lambda times a mean of probabilities
    assert "gate_regularizer_loss" in model.logged_outputs
    assert out.gate_regularizer_loss.requires_grad


@pytest.mark.parametrize(
    "options",
    [dict(gate="gumbel"), dict(gate="gumbel", gumbel_straight_through=True), dict(gate="stochastic")],
    ids=["gumbel", "gumbel-straight-through", "stochastic"],
)
def test_gates_are_deterministic_noise_free_in_evaluation(options):
    from simlap_hf.analysis.gates import gate_matrix
    from simlap_hf.relations import ClassRelations

    model, feature_filter = double_filter(**options)
    model.train()
    matrices = [gate_matrix(model), gate_matrix(model)]  # eval mode inside, train mode restored
    assert model.training and feature_filter.training
    assert torch.equal(matrices[0], matrices[1])
    relations = [ClassRelations.from_model(model).relatedness for _ in range(2)]
    numpy.testing.assert_array_equal(relations[0], relations[1])  # NaN diagonals compare equal
    model.eval()
    y1, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 0, 2])
    with torch.no_grad():
        first, second = model.gate(y1, y2), model.gate(y1, y2)
        mean = authors_gate_logits(feature_filter, y1, y2)
    assert torch.equal(first, second)
    if options["gate"] == "stochastic":
        expected = torch.clamp(mean + 0.5, 0.0, 1.0)
    else:
        expected = torch.sigmoid(mean / model.config.gumbel_temperature)
        if options.get("gumbel_straight_through"):
            expected = torch.round(expected)
    assert_close(first, expected, "noise-free gate")
    assert_close(matrices[0][y1, y2].double(), first, "gate matrix in evaluation mode")


# ----------------------------------------------------------------------------------------------------------------
# The model: parameters, projector, the whole loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm", "none"])
def test_projector_last_norm_matches_their_head(norm):
    """Their build_head(2, D, mlp, K, last_norm): Linear(bias), BatchNorm1d, ReLU, Linear(no bias), then LayerNorm,
    BatchNorm1d without affine parameters, or nothing."""
    model = SimLAPModel(tiny_config(projector_norm=norm)).double().train()
    projector = model.projector
    first, hidden_norm, _, last = list(projector)[:4]
    theirs = [nn.Linear(first.in_features, first.out_features), nn.BatchNorm1d(first.out_features), nn.ReLU()]
    theirs.append(nn.Linear(last.in_features, last.out_features, bias=False))
    if norm == "layernorm":
        theirs.append(nn.LayerNorm(last.out_features))
    elif norm == "batchnorm":
        theirs.append(nn.BatchNorm1d(last.out_features, affine=False))
    theirs = nn.Sequential(*theirs).double().train()
    theirs.load_state_dict(projector.state_dict())
    features = torch.randn(6, first.in_features, dtype=torch.float64)
    assert_close(projector(features), theirs(features), f"projector {norm}")
    assert len(projector) == len(theirs)


def test_model_loss_with_every_option_matches_the_authors_formulation():
    """The whole contrastive loss of the model (fused gate, full form) equals their loss of its embeddings and gates;
    scale_logit starts at log(1 / temperature), alpha at its value, and both receive their gradients."""
    config = tiny_config(loss_form="dot", learnable_temperature=True, alpha=0.5, positive_normalization="anchor")
    model = SimLAPModel(config).double().train()
    assert model.scale_logit.item() == pytest.approx(math.log(10.0)) and model.alpha.item() == 0.5
    with torch.no_grad():
        model.scale_logit.fill_(1.7)
        model.alpha.fill_(0.3)
    pixels = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels, pair_labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([1, 1, 0, 2, 3, 3, 0, 2])
    out = model(pixels, labels=labels, pair_labels=pair_labels)
    scale_grad, alpha_grad = torch.autograd.grad(out.contrastive_loss, [model.scale_logit, model.alpha])
    embeddings = model.projector(model.backbone(pixels))
    gates = torch.sigmoid(authors_gate_logits(model.feature_filter, labels, pair_labels))
    scale_logit = model.scale_logit.detach().clone().requires_grad_(True)
    alpha = model.alpha.detach().clone().requires_grad_(True)
    theirs = authors_loss(embeddings, embeddings, labels, pair_labels, labels, gates, scale_logit.exp(), alpha)
    assert_close(out.contrastive_loss, theirs, "model loss")
    their_scale_grad, their_alpha_grad = torch.autograd.grad(theirs, [scale_logit, alpha])
    assert_close(scale_grad, their_scale_grad, "scale_logit gradient")
    assert_close(alpha_grad, their_alpha_grad, "alpha gradient")
    assert out.logit_scale.item() == pytest.approx(math.exp(1.7)) and out.alpha.item() == pytest.approx(0.3)
    assert {"logit_scale", "alpha"} <= set(model.logged_outputs)


def test_options_round_trip_through_save_and_load(tmp_path):
    config = tiny_config(
        loss_form="dot",
        learnable_temperature=True,
        alpha=0.5,
        positive_normalization="anchor",
        gate="stochastic",
        stochastic_gate_sigma=0.4,
        stochastic_gate_lambda=0.01,
        projector_norm="batchnorm",
    )
    model = SimLAPModel(config)
    with torch.no_grad():
        model.scale_logit.fill_(2.5)
    model.save_pretrained(tmp_path)
    loaded = SimLAPModel.from_pretrained(tmp_path)
    for field in ("loss_form", "learnable_temperature", "alpha", "positive_normalization", "gate", "projector_norm"):
        assert getattr(loaded.config, field) == getattr(config, field), field
    assert loaded.config.stochastic_gate_sigma == 0.4 and loaded.config.stochastic_gate_lambda == 0.01
    assert loaded.scale_logit.item() == 2.5 and loaded.alpha.item() == 0.5
    assert isinstance(loaded.projector[-1], nn.BatchNorm1d) and loaded.projector[-1].weight is None


def test_reference_defaults_add_no_parameters_and_keep_the_reference_loss():
    model = SimLAPModel(tiny_config())
    names = set(model.state_dict())
    assert not {"scale_logit", "alpha"} & names
    assert isinstance(model.projector[-1], nn.LayerNorm)
    assert model.logged_outputs == SimLAPModel.logged_outputs
    config = model.config
    assert (config.loss_form, config.positive_normalization, config.projector_norm) == ("cosine", "batch", "layernorm")
    assert (config.learnable_temperature, config.alpha) == (False, 0.0)
    z, labels, pair_labels, gates = random_inputs(7)
    default = simlap_loss(z, labels, pair_labels, gates, 0.1)
    reference = authors_loss(z, z, labels, pair_labels, labels, gates, 10.0, form="cosine", per_anchor=False)
    assert_close(default, reference, "reference form")
    out = model(torch.randn(8, 3, 16, 16), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert out.gate_regularizer_loss is None and out.logit_scale is None and out.alpha is None


def test_model_card_shows_the_options(tmp_path):
    from simlap_hf.model_card import build_model_card

    config = tiny_config(loss_form="dot", alpha=0.5, gate="stochastic", stochastic_gate_lambda=0.01)
    card = str(build_model_card(tmp_path, "pretrain", config, {"eval_top1": 50.0}, {}, "digits"))
    section = card.split("## SimLAP options", 1)[1].split("\n## ", 1)[0]
    for row in ("| loss_form | dot |", "| alpha | 0.5 |", "| learnable_temperature | False |", "| gate | stochastic |"):
        assert row in section, row
    assert "| stochastic_gate_lambda | 0.01 |" in section and "gumbel_temperature" not in section
    assert "| projector_norm | layernorm |" in section and "| positive_normalization | batch |" in section


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_form="cos"), r"^SimLAPConfig.loss_form='cos' is not valid; choose one of cosine, dot\.$"),
        (
            dict(positive_normalization="pair"),
            r"positive_normalization='pair' is not valid; choose one of batch, anchor",
        ),
        (dict(projector_norm="ln"), r"projector_norm='ln' is not valid; choose one of layernorm, batchnorm, none"),
        (dict(alpha=-0.5), r"alpha=-0.5 is not valid; it must be a number >= 0 \(0: off\)"),
        (dict(learnable_temperature="yes"), r"learnable_temperature='yes' is not valid; it must be True or False"),
        (dict(gumbel_temperature=0.0), r"gumbel_temperature=0.0 is not valid; it must be > 0"),
        (dict(stochastic_gate_sigma=-1.0), r"stochastic_gate_sigma=-1.0 is not valid; it must be > 0"),
        (dict(stochastic_gate_lambda=-1.0), r"stochastic_gate_lambda=-1.0 is not valid; it must be >= 0"),
        (dict(gate="hard"), r"gate='hard' is not valid; choose one of fused, product, open, gumbel, stochastic"),
    ],
)
def test_bad_option_values_fail_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        tiny_config(**overrides)
    assert "\n" not in str(error.value)


@pytest.mark.e2e
def test_flags_build_the_config_and_a_bad_value_is_one_error_line(tmp_path):
    from simlap_hf.training import PLACEHOLDER_LABELS, PRETRAIN_ARGUMENTS, build_pretrain_config, parse_args

    flags = ["--loss_form", "dot", "--learnable_temperature", "--alpha", "0.5", "--positive_normalization", "anchor"]
    flags += [
        "--gate",
        "gumbel",
        "--gumbel_temperature",
        "0.5",
        "--gumbel_straight_through",
        "--projector_norm",
        "none",
    ]
    flags += ["--stochastic_gate_sigma", "0.3", "--stochastic_gate_lambda", "0.1"]
    model_args, data_args, _ = parse_args(PRETRAIN_ARGUMENTS, flags)
    config = build_pretrain_config(model_args, data_args, PLACEHOLDER_LABELS)
    assert (config.loss_form, config.learnable_temperature, config.alpha) == ("dot", True, 0.5)
    assert (config.positive_normalization, config.gate, config.projector_norm) == ("anchor", "gumbel", "none")
    assert (config.gumbel_temperature, config.gumbel_straight_through) == (0.5, True)
    assert (config.stochastic_gate_sigma, config.stochastic_gate_lambda) == (0.3, 0.1)
    done = subprocess.run(
        [sys.executable, "train_pretrain.py", "--dataset_name", "digits", "--output_dir", str(tmp_path / "run")]
        + ["--loss_form", "dott"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: ") and "loss_form='dott'" in lines[-1] and "cosine, dot" in lines[-1]


@pytest.mark.e2e
@pytest.mark.parametrize("gate", ["stochastic", "gumbel"])
def test_training_with_every_option_keeps_one_host_sync_per_step(tmp_path, monkeypatch, gate):
    """A tiny pretraining run with the full later form: no option reads a tensor value on the host in the step."""
    from conftest import write_image_folder
    from test_host_syncs import check_counts, count_tiny_run

    write_image_folder(tmp_path / "images")
    options = dict(loss_form="dot", learnable_temperature="true", alpha=0.5, positive_normalization="anchor")
    per_step = count_tiny_run(tmp_path, monkeypatch, gate=gate, projector_norm="batchnorm", **options)
    check_counts(per_step, expected_steps=9)
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    logged = next(record for record in log if "loss" in record)
    assert {"logit_scale", "alpha"} <= set(logged) and ("gate_regularizer_loss" in logged) == (gate == "stochastic")


# ----------------------------------------------------------------------------------------------------------------
# The ablation in benchmarks/reproduce.py, without the datasets library
# ----------------------------------------------------------------------------------------------------------------


def write_fashion_standin(folder: Path, train_per_class: int = 12, test_per_class: int = 4) -> Path:
    """Fashion-MNIST's IDX layout: 28 x 28 grey images whose mean level depends on the class."""
    rng = numpy.random.default_rng(0)
    folder.mkdir(parents=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = numpy.repeat(numpy.arange(10), per_class)
        images = numpy.clip(20 * labels[:, None, None] + rng.integers(0, 60, (len(labels), 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(numpy.uint8), compress=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(numpy.uint8), compress=True)
    return folder


@pytest.mark.slow
@pytest.mark.e2e
def test_reproduce_runs_the_ablation_without_datasets(tmp_path):
    """The shipped budget file with a short override, Fashion-MNIST from IDX files and digits, and the libraries
    ``datasets`` and ``evaluate`` unimportable in every process (as on a GPU machine without them)."""
    import reproduce

    ablation = reproduce.expand_variants(["ablation"])
    assert ablation[0] == "simlap_fused_arbitrary" and "cross_entropy" in ablation and len(ablation) == 11
    assert reproduce.expand_variants(["paper"]) == reproduce.VARIANT_GROUPS["paper"]
    for name in ablation:
        script, flags = reproduce.VARIANTS[name]
        if script == "pretrain":
            from simlap_hf.training import PLACEHOLDER_LABELS, PRETRAIN_ARGUMENTS, build_pretrain_config, parse_args

            build_pretrain_config(*parse_args(PRETRAIN_ARGUMENTS, flags)[:2], PLACEHOLDER_LABELS)
    blocked = tmp_path / "blocked"
    for library in ("datasets", "evaluate"):
        (blocked / library).mkdir(parents=True)
        (blocked / library / "__init__.py").write_text(f"raise ImportError('{library} is not installed here')\n")
    standin = write_fashion_standin(tmp_path / "fashion")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]),
        "SIMLAP_FASHION_MNIST_DIR": str(standin),
        "OMP_NUM_THREADS": "1",
    }
    output_dir = tmp_path / "ablation"
    command = [sys.executable, "benchmarks/reproduce.py", "benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml"]
    command += [
        "--variants",
        "fastssl_full_distinct",
        "ablate_stochastic_gate",
        "--seeds",
        "0",
        "--threads",
        "1",
        "--workers",
        "0",
    ]
    command += ["--output_dir", str(output_dir), "--override", "num_train_epochs=1", "eval_every=1"]
    command += ["max_train_samples=48", "max_eval_samples=20", "per_device_train_batch_size=24"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((output_dir / "results.json").read_text())
    assert [run["variant"] for run in report["runs"]] == ["fastssl_full_distinct", "ablate_stochastic_gate"]
    for run in report["runs"]:
        assert 0.0 <= run["relations_p5"] <= 1.0 and 0.0 <= run["relations_p10"] <= 1.0
        assert 0.0 <= run["knn_top1"] <= 100.0 and 0.0 <= run["transfer_probe_top1"] <= 100.0
    config = json.loads((output_dir / "fastssl_full_distinct_seed0" / "config.json").read_text())
    assert (config["loss_form"], config["learnable_temperature"], config["alpha"]) == ("dot", True, 0.5)
    assert (config["positive_normalization"], config["pair_mode"]) == ("anchor", "distinct")
    table = (output_dir / "results.md").read_text()
    assert "| relations P@5 | relations P@10 |" in table
    assert f"| {reproduce.LABELS['ablate_stochastic_gate']} |" in table


def test_relation_precision_of_a_model_with_the_garment_classes():
    import reproduce

    names = dict(enumerate(FASHION_MNIST_LABEL_NAMES))
    garments = dict(num_classes=None, id2label=names, label2id={v: k for k, v in names.items()})
    model = SimLAPModel(tiny_config(**garments))
    precisions = reproduce.relation_precisions(model)
    assert set(precisions) == {"relations_p5", "relations_p10"}
    assert all(value in {i / k for k in (5, 10) for i in range(k + 1)} for value in precisions.values())
    assert reproduce.relation_precisions(SimLAPModel(tiny_config())) == {}  # not the garment classes
    assert reproduce.relation_precisions(SimLAPModel(tiny_config(gate="open", **garments))) == {}


# ----------------------------------------------------------------------------------------------------------------
# Two processes equal one process with the whole batch
# ----------------------------------------------------------------------------------------------------------------

DISTRIBUTED_FORMS = {
    "full": dict(form="dot", learnable=True, alpha=0.5, normalization="anchor"),
    "cosine-anchor-alpha": dict(form="cosine", learnable=False, alpha=0.3, normalization="anchor"),
    "dot-batch": dict(form="dot", learnable=True, alpha=None, normalization="batch"),
}


def distributed_worker(output_dir: Path) -> None:
    """Each process holds half of a batch of 2 x 6; keys gathered with gradient; the mean of the per-process losses
    and the process-averaged gradients of the encoder weight, scale_logit and alpha must equal one process's."""
    import torch.distributed as dist

    from simlap_hf import losses
    from simlap_hf.distributed import distributed_mean, gather_labels, gather_with_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    local, features, dim, classes = 6, 5, 8, 3
    inputs = torch.randn(world * local, features, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (world * local,), generator=generator)
    pair_labels = losses.sample_pair_labels(labels, "distinct", classes, generator=generator)
    gates = torch.rand(world * local, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(dim, features, generator=generator, dtype=torch.float64)
    part = slice(rank * local, (rank + 1) * local)
    report = {}
    for name, option in DISTRIBUTED_FORMS.items():
        gradients, values = [], []
        for gathered in (False, True):
            parameters = [
                weight.clone().requires_grad_(True),
                torch.tensor(math.log(1 / 0.2), dtype=torch.float64, requires_grad=True),
                torch.tensor(option["alpha"] or 0.0, dtype=torch.float64, requires_grad=True),
            ]
            rows = part if gathered else slice(None)
            embeddings = inputs[rows] @ parameters[0].T
            keys = gather_with_grad(embeddings) if gathered else embeddings
            key_labels = gather_labels(labels[rows]) if gathered else labels
            terms = losses.simlap_contrastive_terms(
                embeddings,
                labels[rows],
                pair_labels[rows],
                gates[rows],
                0.2,
                keys,
                key_labels,
                form=option["form"],
                logit_scale=parameters[1].exp() if option["learnable"] else None,
                alpha=parameters[2] if option["alpha"] is not None else None,
                positive_normalization=option["normalization"],
            )
            loss = distributed_mean(terms.loss_sum, terms.num_positives, gathered=gathered)
            used = [p for p, on in zip(parameters, (True, option["learnable"], option["alpha"] is not None)) if on]
            grads = torch.autograd.grad(loss, used)
            loss = loss.detach().clone()
            if gathered:  # data-parallel training averages losses and gradients over processes
                for tensor in (loss, *grads):
                    dist.all_reduce(tensor)
                    tensor /= world
            values.append(loss)
            gradients.append(grads)
        errors = [(values[1] - values[0]).abs().item()]
        errors += [((mine - whole).abs().max() / whole.abs().max()).item() for mine, whole in zip(*gradients[::-1])]
        report[name] = {"loss": values[0].item(), "errors": errors}
    (output_dir / f"forms_{rank}.json").write_text(json.dumps(report))


@pytest.mark.e2e
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    command = two_process_command(Path(__file__).resolve(), tmp_path)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"forms_{rank}.json").read_text())
        assert set(report) == set(DISTRIBUTED_FORMS)
        for name, entry in report.items():
            assert math.isfinite(entry["loss"]) and entry["loss"] > 0, name
            assert max(entry["errors"]) < 1e-10, (name, entry)  # float64: one process and two agree to rounding


if __name__ == "__main__":
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    distributed_worker(Path(sys.argv[1]))
    dist.barrier()
    dist.destroy_process_group()
