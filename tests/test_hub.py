"""Hub sharing, offline: uploads to a stand-in Hub server on 127.0.0.1, model cards, remote code, timm export."""

import base64
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml
from card_snippets import card_code_blocks
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors.torch import load_file, save_file
from test_training import tiny_flags

import simlap_hf.hub as hub
import simlap_hf.training.job as training_job
import train_pretrain
from simlap_hf import (
    SimLAPConfig,
    SimLAPForImageClassification,
    SimLAPFuseConfig,
    SimLAPFuseForImageClassification,
    SimLAPImageProcessor,
    SimLAPModel,
)
from simlap_hf.export import export_timm
from simlap_hf.export import main as export_main
from simlap_hf.hub import HubPushError, build_model_card, push_checkpoint, push_output_dir
from simlap_hf.model_card import USAGE_REMOTE_CODE
from simlap_hf.push import main as push_main

GOOD_TOKEN = "hf_test_good_token"
LABELS = {0: "red", 1: "green", 2: "blue", 3: "gray"}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


# ----------------------------------------------------------------------------------------------------------------
# A stand-in for the Hub: the endpoints huggingface_hub calls for create_repo and upload_folder


class FakeHub:
    """Repositories and their files in memory; every request is recorded as (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo, message, paths)
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False
        self.base_url = ""

    def paths(self, repo: str) -> set[str]:
        return set(self.files.get(repo, {}))


def _handler_for(state: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {GOOD_TOKEN}":
                return True
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _repo_missing(self, repo: str) -> bool:
            if repo in state.repos:
                return False
            self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return True

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            body = self._body()
            del body
            state.requests.append(("GET", path))
            match = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/.+)?$", path)
            if not self._authorised():
                return
            if match is None:
                return self._reply(404, {"error": f"no route {path}"})
            repo = match.group(1)
            if self._repo_missing(repo):
                return
            siblings = [{"rfilename": name} for name in sorted(state.paths(repo))]
            self._reply(200, {"id": repo, "sha": f"{len(state.commits):040x}", "private": False, "siblings": siblings})

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            body = self._body()
            state.requests.append(("POST", path))
            if not self._authorised():
                return
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                state.repos.setdefault(repo, {"private": payload.get("visibility") == "private"})
                state.files.setdefault(repo, {})
                return self._reply(200, {"url": f"{state.base_url}/{repo}", "name": repo})
            if path == "/api/validate-yaml":  # README.md metadata, checked before an upload
                content = json.loads(body)["content"]
                front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    metadata = yaml.safe_load(front.group(1)) if front else None
                except yaml.YAMLError as error:
                    return self._reply(400, {"errors": [{"message": str(error)}], "warnings": []})
                if not isinstance(metadata, dict):
                    return self._reply(400, {"errors": [{"message": "no metadata"}], "warnings": []})
                return self._reply(200, {"errors": [], "warnings": []})
            match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$", path)
            if match is None:
                return self._reply(404, {"error": f"no route {path}"})
            repo, action = match.group(1), match.group(2)
            if self._repo_missing(repo):
                return
            if action == "preupload":
                # Everything as regular (base64 in the commit): no LFS or Xet storage to stand in for.
                files = [
                    {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for item in json.loads(body)["files"]
                ]
                return self._reply(200, {"files": files, "commitOid": f"{len(state.commits):040x}"})
            if state.fail_commits:
                return self._reply(400, {"error": "commit refused by the test"})
            message, paths = "", []
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"]["summary"]
                elif item["key"] == "file":
                    value = item["value"]
                    assert value["encoding"] == "base64"
                    state.files[repo][value["path"]] = base64.b64decode(value["content"])
                    paths.append(value["path"])
                elif item["key"] == "deletedFile":
                    state.files[repo].pop(item["value"]["path"], None)
                else:
                    return self._reply(400, {"error": f"unexpected commit operation {item['key']}"})
            state.commits.append((repo, message, paths))
            oid = f"{len(state.commits):040x}"
            self._reply(200, {"commitUrl": f"{state.base_url}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.base_url)
    monkeypatch.setattr(constants, "ENDPOINT", state.base_url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _forbid_training(monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_job, "fit", no_training)


# ----------------------------------------------------------------------------------------------------------------
# Training scripts with --push_to_hub


def test_pretrain_push_uploads_model_code_card_results_and_checkpoints(tiny_image_folder, tmp_path, fake_hub):
    output_dir = tmp_path / "run"
    flags = tiny_flags(tiny_image_folder, output_dir, epochs=1) + [
        "--push_to_hub",
        "--hub_model_id",
        "tester/simlap-tiny",
        "--hub_token",
        GOOD_TOKEN,
        "--push_checkpoints",
    ]
    _, results = train_pretrain.run(flags)

    repo = "tester/simlap-tiny"
    assert fake_hub.requests[0] == ("POST", "/api/repos/create")  # created before anything else
    assert fake_hub.repos[repo] == {"private": False}
    uploaded = fake_hub.files[repo]
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "all_results.json",
        "modeling_simlap.py",
        "configuration_simlap.py",
        "losses.py",
        "preprocessor_config.json",
        "image_processing_simlap.py",
    ):
        assert uploaded[name] == (output_dir / name).read_bytes(), name
    # The final push leaves checkpoints out; --push_checkpoints uploaded the epoch's checkpoint into checkpoints/.
    checkpoint_files = {p for p in uploaded if p.startswith("checkpoints/")}
    assert "checkpoints/checkpoint-00000009/trainer_state.json" in checkpoint_files
    assert "checkpoints/checkpoint-00000009/model.safetensors" in checkpoint_files
    assert [message for _, message, _ in fake_hub.commits] == ["Checkpoint checkpoint-00000009", "End of training"]
    assert json.loads(uploaded["all_results.json"]) == results
    assert json.loads(uploaded["config.json"])["auto_map"]["AutoModel"] == "modeling_simlap.SimLAPModel"
    assert json.loads(uploaded["preprocessor_config.json"])["auto_map"] == {
        "AutoImageProcessor": "image_processing_simlap.SimLAPImageProcessor"
    }

    readme = tmp_path / "uploaded_README.md"
    readme.write_bytes(uploaded["README.md"])
    card = ModelCard.load(readme)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    for tag in ("simlap", "contrastive-learning", "image-classification", "resnet10t"):
        assert tag in card.data.tags
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics["accuracy"] == pytest.approx(results["eval_top1"])
    assert metrics["top_5_accuracy"] == pytest.approx(results["eval_top5"])
    assert metrics["knn_accuracy"] == pytest.approx(results["eval_knn_top1"])
    index = card.data.to_dict()["model-index"][0]
    assert index["name"] == "simlap-tiny"
    assert 'pipeline("image-feature-extraction", model="tester/simlap-tiny", trust_remote_code=True)' in card.text
    assert "python -m simlap_hf.export --format onnx tester/simlap-tiny simlap-tiny-onnx" in card.text
    assert "learning_rate" in card.text and "arXiv:2410.18200" in card.text
    assert GOOD_TOKEN not in uploaded["README.md"].decode()


def test_bad_token_fails_before_training(tiny_image_folder, tmp_path, fake_hub, monkeypatch):
    _forbid_training(monkeypatch)
    flags = tiny_flags(tiny_image_folder, tmp_path / "run") + [
        "--push_to_hub",
        "--hub_model_id",
        "tester/simlap-tiny",
        "--hub_token",
        "hf_wrong",
    ]
    with pytest.raises(HubPushError, match=r"(?s)401 Unauthorized.*--hub_token or HF_TOKEN"):
        train_pretrain.run(flags)
    assert ("POST", "/api/repos/create") in fake_hub.requests
    assert not fake_hub.commits and not (tmp_path / "run" / "model.safetensors").exists()


def test_missing_token_or_id_fails_before_training(tiny_image_folder, tmp_path, fake_hub, monkeypatch):
    _forbid_training(monkeypatch)
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no HF_TOKEN and no saved login
    flags = tiny_flags(tiny_image_folder, tmp_path / "run") + ["--push_to_hub"]
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        train_pretrain.run(flags)
    with pytest.raises(HubPushError, match="needs a Hugging Face token.*--hub_token, set HF_TOKEN"):
        train_pretrain.run(flags + ["--hub_model_id", "tester/simlap-tiny"])
    assert fake_hub.requests == []


def test_offline_mode_fails_at_start(tiny_image_folder, tmp_path, fake_hub, monkeypatch):
    _forbid_training(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = tiny_flags(tiny_image_folder, tmp_path / "run") + [
        "--push_to_hub",
        "--hub_model_id",
        "tester/simlap-tiny",
        "--hub_token",
        GOOD_TOKEN,
    ]
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set.*python -m simlap_hf.push"):
        train_pretrain.run(flags)
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------------------------------------------
# Pushing a saved folder


def _tiny_values(**kwargs) -> dict:
    values = dict(
        backbone="resnet10t",
        backbone_kwargs={"stem_type": "deep", "output_stride": 8},
        out_dim=16,
        mlp_dim=32,
        filter_embed_dim=16,
        filter_hidden_dim=16,
        image_size=16,
        id2label=LABELS,
        label2id={name: i for i, name in LABELS.items()},
    )
    values.update(kwargs)
    return values


def _tiny_config(**kwargs) -> SimLAPConfig:
    return SimLAPConfig(**_tiny_values(**kwargs))


def _tiny_fuse_config() -> SimLAPFuseConfig:
    return SimLAPFuseConfig(head_dim=512, head_hidden_mult=1, **_tiny_values())


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics, so that comparisons exercise every buffer."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def _save_processor(folder: Path) -> None:
    """The processor the training scripts save: SimLAP's own, with its code and auto_map."""
    SimLAPImageProcessor(16, 0.875, "bicubic", MEAN, STD, 3).save_pretrained(folder)


def _saved_output_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    SimLAPModel(_tiny_config()).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"eval_top1": 50.0}))
    (folder / "all_results.json.tmp").write_text("partial")
    checkpoint = folder / "checkpoints" / "checkpoint-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (folder / "checkpoints" / ".tmp-checkpoint-00000008").mkdir()
    (folder / "checkpoints" / ".tmp-checkpoint-00000008" / "trainer_state.json").write_text("{}")
    return folder


def test_push_command_uploads_an_existing_folder(tmp_path, fake_hub, capsys, monkeypatch):
    folder = _saved_output_dir(tmp_path)
    assert push_main([str(folder), "--hub_model_id", "tester/later", "--hub_token", GOOD_TOKEN, "--private"]) == 0
    assert "pushed: " in capsys.readouterr().out
    assert fake_hub.repos["tester/later"] == {"private": True}
    assert fake_hub.paths("tester/later") == {
        "config.json",
        "model.safetensors",
        "all_results.json",
        "modeling_simlap.py",
        "configuration_simlap.py",
        "losses.py",
        "distributed.py",
        "utils.py",
    }
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # the token may come from the environment
    assert push_main([str(folder), "--hub_model_id", "tester/later", "--include_checkpoints"]) == 0
    assert "checkpoints/checkpoint-00000004/trainer_state.json" in fake_hub.paths("tester/later")
    assert not any(".tmp" in path for path in fake_hub.paths("tester/later"))

    assert push_main([str(folder), "--hub_model_id", "tester/later", "--hub_token", "hf_wrong"]) == 1
    assert "401 Unauthorized" in capsys.readouterr().err
    assert push_main([str(tmp_path / "missing"), "--hub_model_id", "tester/later"]) == 1


def test_failed_upload_keeps_folder_and_says_how_to_push_later(tmp_path, fake_hub, caplog):
    folder = _saved_output_dir(tmp_path)
    hub.create_hub_repo("tester/flaky", GOOD_TOKEN, private=False)
    fake_hub.fail_commits = True
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(
        HubPushError,
        match=rf"python -m simlap_hf.push {re.escape(str(folder))} --hub_model_id "
        "tester/flaky",
    ):
        push_output_dir(folder, "tester/flaky", GOOD_TOKEN, "End of training")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    # A checkpoint upload that fails only warns: training goes on.
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        assert push_checkpoint(folder / "checkpoints" / "checkpoint-00000004", "tester/flaky", GOOD_TOKEN) is None
    assert "--include_checkpoints" in caplog.text
    with pytest.raises(HubPushError):
        push_checkpoint(folder / "checkpoints" / "checkpoint-00000004", "tester/flaky", GOOD_TOKEN, raise_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Model cards


def test_card_of_a_fine_tuned_model(tmp_path):
    config = _tiny_config()
    hyper = {"learning_rate": 0.1, "opt": "sgd", "hub_token": "secret"}
    card = build_model_card(
        tmp_path,
        "finetune",
        config,
        {"eval_top1": 91.5, "eval_top5": 99.7},
        hyper,
        "cifar10",
        repo_id="tester/finetuned",
        base_model="tester/simlap-pretrained",
    )
    assert card.data.base_model == "tester/simlap-pretrained"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.pipeline_tag == "image-classification"
    assert [r.metric_value for r in card.data.eval_results] == [91.5, 99.7]
    assert "secret" not in str(card)
    # A local base model is named in the text, not in the metadata (which needs a Hub id).
    local = build_model_card(tmp_path, "finetune", config, {}, {}, "digits", base_model=str(tmp_path))
    assert local.data.base_model is None and local.data.datasets is None and str(tmp_path) in local.text


# ----------------------------------------------------------------------------------------------------------------
# Remote code: saved folders load where simlap_hf cannot be imported


REMOTE_CODE_CHECK = """
import importlib.util
import re
import sys
from pathlib import Path

sys.modules["simlap_hf"] = None  # whatever is installed, the package must not be importable here
assert importlib.util.find_spec("simlap_hf") is None
try:
    import simlap_hf  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("simlap_hf is importable")

import torch
import yaml
from safetensors.torch import load_file
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

root = Path(sys.argv[1])
image = Image.open(root / "image.png")
expected = load_file(root / "expected.safetensors")
x = expected["pixel_values"]
with torch.no_grad():
    model = AutoModel.from_pretrained(root / "pretrained", trust_remote_code=True).eval()
    assert type(model).__name__ == "SimLAPModel" and "simlap_hf" not in type(model).__module__
    out = model(x)
    for name in ("logits", "embeddings", "pooler_output"):
        torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-5, atol=1e-5)
    gates = model.gate(torch.tensor([0, 1]), torch.tensor([2, 3]))
    torch.testing.assert_close(gates, expected["gates"], rtol=1e-5, atol=1e-5)
    for folder, cls in (("classifier", "SimLAPForImageClassification"), ("fuse", "SimLAPFuseForImageClassification")):
        classifier = AutoModelForImageClassification.from_pretrained(root / folder, trust_remote_code=True).eval()
        assert type(classifier).__name__ == cls, type(classifier)
        torch.testing.assert_close(classifier(x).logits, expected[folder], rtol=1e-5, atol=1e-5)
    processor = AutoImageProcessor.from_pretrained(root / "classifier", trust_remote_code=True)
    assert type(processor).__name__ == "SimLAPImageProcessor" and "simlap_hf" not in type(processor).__module__
    torch.testing.assert_close(processor(image)["pixel_values"], expected["processed"], rtol=0, atol=1e-6)
# The cards' remote-code snippets run as written.
for snippet in sorted(root.glob("snippets/*.py")):
    exec(compile(snippet.read_text(), str(snippet), "exec"), {})
print("REMOTE CODE OK")
"""


def test_saved_folders_load_with_remote_code_without_simlap_hf(tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification

    torch.manual_seed(0)
    pretrained = _randomise_batchnorm(SimLAPModel(_tiny_config()))
    classifier = _randomise_batchnorm(SimLAPForImageClassification(_tiny_config(classifier_dropout=0.1)), seed=1)
    fuse = _randomise_batchnorm(SimLAPFuseForImageClassification(_tiny_fuse_config()), seed=2)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = pretrained(x)
        expected = {
            "pixel_values": x,
            "logits": out.logits,
            "embeddings": out.embeddings,
            "pooler_output": out.pooler_output,
            "gates": pretrained.gate(torch.tensor([0, 1]), torch.tensor([2, 3])),
            "classifier": classifier(x).logits,
            "fuse": fuse(x).logits,
        }
    for folder, model, task in (
        ("pretrained", pretrained, "pretrain"),
        ("classifier", classifier, "finetune"),
        ("fuse", fuse, "fuse"),
    ):
        model.save_pretrained(tmp_path / folder)
        _save_processor(tmp_path / folder)
        card = build_model_card(tmp_path / folder, task, model.config, {"eval_top1": 1.0}, {}, "digits")
        card.save(tmp_path / folder / "README.md")
        for index, snippet in enumerate(card_code_blocks(card.text, USAGE_REMOTE_CODE, "python")):
            (tmp_path / "snippets").mkdir(exist_ok=True)
            (tmp_path / "snippets" / f"{folder}_{index}.py").write_text(snippet)
        saved = json.loads((tmp_path / folder / "config.json").read_text())
        assert saved["auto_map"]["AutoConfig"].startswith("configuration_simlap.")
        for code in ("modeling_simlap.py", "configuration_simlap.py", "losses.py", "image_processing_simlap.py"):
            assert (tmp_path / folder / code).is_file()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 27, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    expected["processed"] = SimLAPImageProcessor.from_pretrained(tmp_path / "classifier")(image)["pixel_values"]
    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))
    fuse_map = json.loads((tmp_path / "fuse" / "config.json").read_text())["auto_map"]
    assert fuse_map["AutoConfig"] == "configuration_simlap.SimLAPFuseConfig"
    assert fuse_map["AutoModelForImageClassification"] == "modeling_simlap.SimLAPFuseForImageClassification"

    # With simlap_hf imported, loading needs no remote code and gives the package's classes.
    assert type(AutoModel.from_pretrained(tmp_path / "pretrained")) is SimLAPModel
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "classifier")) is (
        SimLAPForImageClassification
    )

    script = tmp_path / "check_remote_code.py"
    script.write_text(textwrap.dedent(REMOTE_CODE_CHECK))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "REMOTE CODE OK" in completed.stdout


# ----------------------------------------------------------------------------------------------------------------
# timm export


def test_timm_export_loads_in_timm_and_transformers_without_remote_code(tmp_path):
    import timm
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    torch.manual_seed(0)
    model = _randomise_batchnorm(SimLAPForImageClassification(_tiny_config(classifier_dropout=0.2)))
    source = tmp_path / "finetuned"
    model.save_pretrained(source)
    _save_processor(source)
    out = tmp_path / "timm_export"
    assert export_main([str(source), str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "num_classes" not in config["model_args"]
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 4
    assert config["label_names"] == ["red", "green", "blue", "gray"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == MEAN and cfg["std"] == STD

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).logits
        timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(timm_model(x), expected, rtol=1e-5, atol=1e-5)
        wrapped = AutoModelForImageClassification.from_pretrained(out).eval()
        assert type(wrapped).__name__ == "TimmWrapperForImageClassification"
        assert wrapped.config.id2label == LABELS
        torch.testing.assert_close(wrapped(x).logits, expected, rtol=1e-5, atol=1e-5)

    # The pipeline preprocesses like the evaluation transform (resize 18, centre crop 16, normalise).
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(21, 19, 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    classify = pipeline("image-classification", model=str(out))
    predictions = classify(image, top_k=4)
    transform = timm.data.create_transform(input_size=16, crop_pct=0.875, interpolation="bicubic", mean=MEAN, std=STD)
    with torch.no_grad():
        probabilities = model(transform(image).unsqueeze(0)).logits.softmax(-1)[0]
    for prediction in predictions:
        index = {name: i for i, name in LABELS.items()}[prediction["label"]]
        assert prediction["score"] == pytest.approx(float(probabilities[index]), abs=1e-5)

    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["fc.weight"], model.classifier.weight.detach())


def test_timm_export_of_pretrained_online_head_and_errors(tmp_path):
    import timm

    model = _randomise_batchnorm(SimLAPModel(_tiny_config()))
    with pytest.raises(ValueError, match="needs the normalisation"):
        export_timm(model, tmp_path / "no_stats")
    out = export_timm(model, tmp_path / "online_head", mean=[0.3], std=[0.4], crop_pct=1.0)
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["mean"] == [0.3] * 3 and cfg["std"] == [0.4] * 3 and cfg["crop_pct"] == 1.0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(timm_model(x), model(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SimLAP-Fuse"):
        export_timm(SimLAPFuseForImageClassification(_tiny_fuse_config()), tmp_path / "fuse", mean=MEAN, std=STD)
