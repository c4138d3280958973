"""The README's quickstart runs as written, and its first code block holds exactly the two commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_first_block_is_the_two_commands():
    first = re.search(r"^```[a-z]*\n(.*?)^```", README.read_text(), flags=re.S | re.M).group(1)
    assert [line for line in first.splitlines() if line.strip()] == ["make demo", "make test"]


def test_quickstart_runs(tmp_path, monkeypatch):
    (code,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    elastic, small, test = namespace["elastic"], namespace["small"], namespace["test"]
    assert (tmp_path / "supernet.safetensors").is_file()
    assert 0 < elastic.macs() <= 0.5 * elastic.full_macs  # the saved subnet came back with the file
    images = test[:16][0]
    import torch

    with torch.no_grad():
        small.eval()
        assert torch.allclose(small(images), elastic.set_subnet(macs=0.5)(images), atol=1e-4, rtol=1e-4)
