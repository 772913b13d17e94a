"""The quickstart config on the real digits data (slow: about half a minute of training on 2 idle CPU cores)."""

import json
from pathlib import Path

import pytest

import train_pretrain


@pytest.mark.slow
def test_quickstart_reaches_97_percent_online_head_top1(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart_digits.yaml"
    _, results = train_pretrain.run([str(config), "--output_dir", str(tmp_path / "quickstart")])
    assert results["eval_top1"] >= 97.0, results
    assert results["eval_knn_top1"] >= 95.0, results
    saved = json.loads((tmp_path / "quickstart" / "all_results.json").read_text())
    assert saved["epochs"] == 6
