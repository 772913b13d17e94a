"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape == (8, 10)
    assert namespace["gates"].shape == (2, 256)
    assert namespace["classifier"].config.num_labels == 2
    assert (tmp_path / "my-simlap" / "model.safetensors").is_file()


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[1] == "```bash"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")
