"""The README's "Using it" example runs as pasted (at smaller sizes), so it stays runnable."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SIZES = "SAMPLES, BATCH, IMG, EPOCHS = "


def using_it_block() -> str:
    text = README.read_text()
    section = text[text.index("## Using it\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_using_it_runs_as_pasted(tmp_path, monkeypatch, capsys):
    code = using_it_block()
    assert code.count(SIZES) == 1, "the example's sizes line moved: update this test"
    code = re.sub(re.escape(SIZES) + r"[^#\n]*", SIZES + "8, 4, 64, 1  ", code)  # two steps of 4 at 64 px
    monkeypatch.chdir(tmp_path)  # the example writes pretrained.pt and ckpt.pt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope: dict = {"__name__": "__readme__"}
        exec(compile(code, str(README), "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "boundary: 4, 6, 9" in out and "epoch 0: loss " in out
    plain = scope["yolov5"]("n", nc=3)
    plain.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True)
    assert scope["model"] is not scope["fm"] and all(p.requires_grad for p in scope["model"].parameters())
