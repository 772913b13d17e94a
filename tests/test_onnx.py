"""ONNX export (``python -m simlap_hf.export --format onnx``): onnxruntime against PyTorch on the digits test split,
feature extraction, SimLAP-Fuse, the dynamic batch axis, the processor beside the model and the user's mistakes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from simlap_hf import SimLAPForImageClassification, SimLAPFuseConfig, SimLAPFuseForImageClassification, SimLAPModel
from simlap_hf.export import ONNX_FILE, QUANTIZED_ONNX_FILE
from simlap_hf.export import main as export_main
from simlap_hf.image_processing_simlap import SimLAPImageProcessor

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import bench_onnx  # noqa: E402  (after the skips: it needs onnxruntime)


def test_digits_classifier_onnx_top1_equals_pytorch(capsys):
    """The benchmark as README runs it, shortened (1 epoch, 1 timed pass): float32 onnxruntime predicts every digits
    test image as PyTorch does, its logits within 1e-4; the INT8 model is measured on the same images."""
    result = bench_onnx.main(["--epochs", "1", "--repeats", "1", "--seed", "0"])
    printed = capsys.readouterr().out
    print(printed)
    assert f"max |onnxruntime - PyTorch| logit difference: {result['max_abs_difference_onnx']:.3g}" in printed
    assert result["images"] == 360
    assert result["max_abs_difference_onnx"] <= 1e-4
    assert result["onnx_same_predictions"] and result["top1"]["onnx"] == result["top1"]["pytorch"]
    assert result["top1"]["pytorch"] > 30.0  # one epoch learns the digits well beyond chance (10%)
    assert 0 <= result["top1"]["onnx_int8"] <= 100 and result["speedup_int8_vs_onnx"] > 0
    assert result["model_bytes"]["onnx_int8"] < result["model_bytes"]["onnx"] / 2  # INT8 weights


def _saved(model: torch.nn.Module, folder: Path, size: int = 16) -> Path:
    model.eval().save_pretrained(folder)
    SimLAPImageProcessor(size, 0.875, "bilinear", [0.4] * 3, [0.3] * 3, 3).save_pretrained(folder)
    return folder


def _session_outputs(onnx_dir: Path, pixel_values: torch.Tensor) -> tuple[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    (output,) = session.get_outputs()
    return output.name, session.run(None, {"pixel_values": pixel_values.numpy()})[0]


def test_feature_extractor_and_fuse_exports_match_pytorch_at_any_batch(tmp_path):
    torch.manual_seed(0)
    pretrained = SimLAPModel(tiny_config())
    fuse = SimLAPFuseForImageClassification(
        SimLAPFuseConfig(**{**tiny_config().to_dict(), "head_dim": 512, "head_hidden_mult": 1})
    )
    classifier = SimLAPForImageClassification(tiny_config())
    cases = (
        ("pretrained", pretrained, [], "pooler_output", lambda m, x: m.get_image_features(x)),
        ("fuse", fuse, [], "logits", lambda m, x: m(x).logits),
        ("classifier", classifier, ["--task", "feature-extraction"], "pooler_output", lambda m, x: m.backbone(x)),
    )
    for name, model, flags, output_name, reference in cases:
        out = tmp_path / f"{name}-onnx"
        assert export_main(["--format", "onnx", str(_saved(model, tmp_path / name)), str(out), *flags]) == 0
        for batch in (1, 5):  # the batch axis is dynamic (the export traced a batch of 2)
            pixel_values = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
            got_name, got = _session_outputs(out, pixel_values)
            with torch.no_grad():
                expected = reference(model.eval(), pixel_values).numpy()
            assert got_name == output_name and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        for file in ("config.json", "preprocessor_config.json", "image_processing_simlap.py"):
            assert (out / file).is_file(), file
        assert json.loads((out / "preprocessor_config.json").read_text())["auto_map"] == {
            "AutoImageProcessor": "image_processing_simlap.SimLAPImageProcessor"
        }
        assert not (out / QUANTIZED_ONNX_FILE).exists()


def test_onnx_export_mistakes_print_one_line(tmp_path, capsys):
    pretrained = _saved(SimLAPModel(tiny_config()), tmp_path / "pretrained")
    capsys.readouterr()
    assert (
        export_main(["--format", "onnx", str(pretrained), str(tmp_path / "o"), "--task", "image-classification"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --task image-classification needs a classifier") and len(err.splitlines()) == 1

    bare = tmp_path / "bare"
    SimLAPForImageClassification(tiny_config()).save_pretrained(bare)
    capsys.readouterr()
    assert export_main(["--format", "onnx", str(bare), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "preprocessor_config.json" in err and len(err.splitlines()) == 1

    other_size = _saved(SimLAPForImageClassification(tiny_config()), tmp_path / "other", size=24)
    capsys.readouterr()
    assert export_main(["--format", "onnx", str(other_size), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "3 x 24 x 24 images but config.json says 3 x 16 x 16" in err and len(err.splitlines()) == 1
