"""A shared model works for anyone: folders written by the three training scripts, copied as a Hub download would copy
them, run every snippet of their own model card, with SimLAP-HF and in a fresh interpreter where it cannot be
imported; one input size from fine-tuning at a new ``--input_size`` to the card and the exports."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from card_snippets import card_code_blocks
from conftest import tiny_run_flags, write_image_folder
from huggingface_hub.utils import filter_repo_objects

import train_finetune
import train_fuse
import train_pretrain
from simlap_hf.export import main as export_main
from simlap_hf.hub import CHECKPOINT_PATTERNS, IGNORE_PATTERNS
from simlap_hf.model_card import USAGE_ONNX, USAGE_REMOTE_CODE, USAGE_WITH_PACKAGE

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PRETRAIN_SIZE, FINETUNE_SIZE = 16, 24
SHARED_FLAGS = ["--aa", "none", "--reprob", "0", "--per_device_eval_batch_size", "16", "--seed", "3"]
CLASSIFIER_FLAGS = [
    "--train_val_split",
    "0.25",
    "--per_device_train_batch_size",
    "12",
    "--num_train_epochs",
    "1",
    "--mixup",
    "0",
    "--cutmix",
    "0",
    *SHARED_FLAGS,
]


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory) -> dict[str, Path]:
    """A pretrained (16 px), a fine-tuned (from it, at 24 px) and a Fuse (16 px) output folder of the scripts."""
    root = tmp_path_factory.mktemp("runs")
    images = write_image_folder(root / "images", images_per_class=8)
    folders = {"pretrained": root / "pretrained", "finetuned": root / "finetuned", "fuse": root / "fuse"}
    train_pretrain.run(tiny_run_flags(folders["pretrained"], images, num_train_epochs=1))
    assert (folders["pretrained"] / "checkpoints").is_dir()  # left out of the download below
    train_finetune.run(
        ["--model_name_or_path", str(folders["pretrained"]), "--train_dir", images]
        + ["--output_dir", str(folders["finetuned"]), "--input_size", str(FINETUNE_SIZE), *CLASSIFIER_FLAGS]
    )
    train_fuse.run(
        ["--model_name", "resnet10t", "--head_hidden_mult", "1", "--train_dir", images]
        + ["--output_dir", str(folders["fuse"]), "--input_size", str(PRETRAIN_SIZE), *CLASSIFIER_FLAGS]
    )
    return folders


def download_copy(folder: Path, destination: Path) -> Path:
    """The files of ``folder`` that an upload (``python -m simlap_hf.push``, without checkpoints) carries, copied to
    ``destination``: what a download of the repository holds."""
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    for name in filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS + CHECKPOINT_PATTERNS):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, destination / name)
    return destination


# Runs snippet files, each in a fresh namespace, and writes the results they leave (predictions, features, logits) as
# JSON. With --blocked, simlap_hf cannot be imported (whatever is installed).
SNIPPET_RUNNER = """
import json
import sys
from pathlib import Path

if sys.argv[1] == "--blocked":
    sys.modules["simlap_hf"] = None
    try:
        import simlap_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("simlap_hf is importable")

import numpy as np

def plain(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(float).tolist()
    return value

results = {}
for snippet in sys.argv[3:]:
    namespace = {"__name__": "__main__"}
    exec(compile(Path(snippet).read_text(), snippet, "exec"), namespace)
    names = ("predictions", "features", "logits")
    results[Path(snippet).stem] = {name: plain(namespace[name]) for name in names if name in namespace}
Path(sys.argv[2]).write_text(json.dumps(results))
print("SNIPPETS OK")
"""


def run_snippets(workdir: Path, snippets: list[Path], blocked: bool, env: dict[str, str]) -> dict:
    """Run ``snippets`` in a fresh interpreter (``-I``: no PYTHONPATH, no user site, cwd outside the repository)."""
    runner = workdir / "run_snippets.py"
    runner.write_text(textwrap.dedent(SNIPPET_RUNNER))
    results = workdir / ("blocked.json" if blocked else "package.json")
    completed = subprocess.run(
        [sys.executable, "-I", str(runner), "--blocked" if blocked else "--package", str(results), *map(str, snippets)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(results.read_text())


def test_downloaded_folders_run_their_cards_without_simlap_hf(trained_folders, tmp_path, monkeypatch):
    workdir = tmp_path / "elsewhere"  # outside the repository: nothing of it is importable from the cwd
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # With the package: this checkout's.
    package_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    snippets: dict[str, list[Path]] = {"package": [], "blocked": []}
    for name, trained in trained_folders.items():
        download = download_copy(trained, tmp_path / "downloads" / name)
        assert not (download / "checkpoints").exists() and (download / "image_processing_simlap.py").is_file()
        processor_config = json.loads((download / "preprocessor_config.json").read_text())
        assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_simlap.SimLAPImageProcessor"}
        card = (download / "README.md").read_text().replace(str(trained), str(download))
        sections = {
            "package": card_code_blocks(card, USAGE_WITH_PACKAGE, "python"),
            "remote": card_code_blocks(card, USAGE_REMOTE_CODE, "python"),
            "onnx": card_code_blocks(card, USAGE_ONNX, "python"),
        }
        assert [len(blocks) for blocks in sections.values()] == [1, 1 if name == "pretrained" else 2, 1]
        for command in card_code_blocks(card, USAGE_ONNX, "bash"):
            words = shlex.split(command)
            assert words[:3] == ["python", "-m", "simlap_hf.export"]
            monkeypatch.chdir(workdir)  # the card's ONNX folder is relative to where the command runs
            assert export_main(words[3:]) == 0
        for kind, blocks in sections.items():
            for index, code in enumerate(blocks):
                path = workdir / f"{name}-{kind}-{index}.py"
                path.write_text(code)
                # The remote-code snippets run both ways: their results must not depend on the package.
                if kind in ("package", "remote"):
                    snippets["package"].append(path)
                if kind in ("remote", "onnx"):
                    snippets["blocked"].append(path)

    with_package = run_snippets(workdir, snippets["package"], blocked=False, env=package_env)
    without = run_snippets(workdir, snippets["blocked"], blocked=True, env=env)

    def values(results: dict, snippet: str, name: str) -> torch.Tensor:
        return torch.tensor(results[snippet][name])

    # Pretrained: the features of the package's AutoModel, the remote-code pipeline (both ways) and ONNX agree.
    features = values(with_package, "pretrained-package-0", "features")
    assert features.shape[0] == 1 and features.shape[1] > 0
    for results, snippet in ((with_package, "pretrained-remote-0"), (without, "pretrained-remote-0")):
        torch.testing.assert_close(values(results, snippet, "features").reshape(features.shape), features)
    torch.testing.assert_close(values(without, "pretrained-onnx-0", "features"), features, rtol=0, atol=1e-4)
    # Classifiers: the pipeline's predictions with the package equal the remote-code pipeline's without it; the
    # remote-code AutoModelForImageClassification and ONNX logits agree and pick the pipeline's top label.
    for name in ("finetuned", "fuse"):
        expected = with_package[f"{name}-package-0"]["predictions"]
        for results in (with_package, without):
            got = results[f"{name}-remote-0"]["predictions"]
            assert [p["label"] for p in got] == [p["label"] for p in expected]
            assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-5)
        logits = values(without, f"{name}-remote-1", "logits")
        torch.testing.assert_close(values(with_package, f"{name}-remote-1", "logits"), logits)
        torch.testing.assert_close(values(without, f"{name}-onnx-0", "logits"), logits, rtol=0, atol=1e-4)
        labels = json.loads((trained_folders[name] / "config.json").read_text())["id2label"]
        assert labels[str(int(logits.argmax()))] == expected[0]["label"]


def test_fine_tuning_at_a_new_input_size_updates_config_processor_card_and_exports(trained_folders, tmp_path):
    import onnx

    from simlap_hf.export import export_onnx, export_timm

    pretrained = json.loads((trained_folders["pretrained"] / "config.json").read_text())
    assert pretrained["image_size"] == PRETRAIN_SIZE
    folder = trained_folders["finetuned"]
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["image_size"] == FINETUNE_SIZE
    assert processor["size"] == {"shortest_edge": FINETUNE_SIZE}
    card = (folder / "README.md").read_text()
    size = f"{FINETUNE_SIZE} x {FINETUNE_SIZE}"
    assert f"Input: 3 x {size} images" in card and f"Resize to {FINETUNE_SIZE} /" in card
    assert f'Image.new("RGB", ({FINETUNE_SIZE}, {FINETUNE_SIZE})' in card and f"{PRETRAIN_SIZE} x" not in card

    timm_dir = export_timm(folder, tmp_path / "timm")
    timm_config = json.loads((timm_dir / "config.json").read_text())["pretrained_cfg"]
    assert timm_config["input_size"] == [3, FINETUNE_SIZE, FINETUNE_SIZE]
    assert f"Preprocessing: {size} input" in (timm_dir / "README.md").read_text()
    onnx_dir = export_onnx(folder, tmp_path / "onnx")
    graph_input = onnx.load(str(onnx_dir / "model.onnx")).graph.input[0]
    dims = [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim]
    assert dims[1:] == [3, FINETUNE_SIZE, FINETUNE_SIZE] and isinstance(dims[0], str)  # dynamic batch
    assert json.loads((onnx_dir / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": FINETUNE_SIZE}
    assert json.loads((onnx_dir / "config.json").read_text())["image_size"] == FINETUNE_SIZE


def _vit_pretrained_folder(tmp_path: Path, image_size: int) -> Path:
    from conftest import tiny_config

    from simlap_hf import SimLAPModel

    kwargs = {"img_size": image_size, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    folder = tmp_path / "vit"
    SimLAPModel(
        tiny_config(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, image_size=image_size)
    ).save_pretrained(folder)
    return folder


def test_fixed_size_backbones_follow_input_size_or_stop_with_one_line(tmp_path, capsys):
    from simlap_hf.data import DataArguments
    from simlap_hf.training import build_pretrain_config
    from simlap_hf.training.arguments import PretrainModelArguments

    # A ViT takes its img_size from --input_size.
    model_args = PretrainModelArguments(model_name="vit_tiny_patch16_224", model_kwargs='{"patch_size": 8}')
    config = build_pretrain_config(model_args, DataArguments(input_size=24), ["a", "b"])
    assert config.image_size == 24 and config.backbone_kwargs["img_size"] == 24
    # A ResNet has no img_size.
    resnet = build_pretrain_config(PretrainModelArguments(model_name="resnet10t"), DataArguments(input_size=24), ["a"])
    assert "img_size" not in resnet.backbone_kwargs and resnet.image_size == 24

    folder = _vit_pretrained_folder(tmp_path, 16)
    missing_data = ["--train_dir", str(tmp_path / "no_such_folder"), "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    code = train_finetune.main(["--model_name_or_path", str(folder), "--input_size", "24", *missing_data])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --input_size 24 differs from the 16 pixels") and "--input_size 16" in err
    code = train_pretrain.main(
        ["--model_name", "vit_tiny_patch16_224", "--model_kwargs", '{"img_size": 32}', "--input_size", "16"]
        + missing_data
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "--model_kwargs sets img_size 32" in err, err
