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
    code = _blocks("python")[0]
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


def test_huggingface_quickstart_runs(tmp_path, monkeypatch):
    """The MiniLM block: WPAC+ on real weights, half of every module, extract and save."""
    hf_code = _blocks("python")[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(hf_code, str(README), "exec"), namespace)
    import torch

    elastic, small, held_out, out = namespace["elastic"], namespace["small"], namespace["held_out"], namespace["out"]
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert (tmp_path / "minilm.safetensors").is_file()
    assert 0.4 < elastic.macs() / elastic.full_macs < 0.6
    batch = next(iter(held_out))
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(**batch).last_hidden_state, out.last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    scores = namespace["agreement"](namespace["embed"](namespace["original"], held_out),
                                    namespace["embed"](elastic, held_out))
    assert 0.5 < scores["mean_cosine"] < 1.0  # half of everything is not the full model, but close to it
