"""Run code under transformers 4.46, the version NVlabs/VILA pins, next to this project's 5.x.

`transformers4_python()` builds, once per machine, a virtual environment with the torch of this
one and `transformers==4.46.0` (tokenizers 0.20), cached under `$LONGVILA_CACHE` (or
`~/.cache/longvila_mcore`) in `venvs/`; it is complete when its marker file exists, so an
interrupted build is redone. `run_check(...)` runs `tests/transformers4_check.py` in it on an
exported VILA-layout directory, with inputs and outputs passed as safetensors files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRANSFORMERS = "transformers==4.46.0"
REQUIREMENTS = (TRANSFORMERS, "tokenizers==0.20.*", "pillow")
"""Besides torch; pillow for SiglipImageProcessor, as VILA installs it."""
CHECK_SCRIPT = Path(__file__).with_name("transformers4_check.py")
_MARKER = "longvila-ready"


def _venv_dir() -> Path:
    base = os.environ.get("LONGVILA_CACHE") or Path.home() / ".cache/longvila_mcore"
    torch_version = torch.__version__.split("+")[0]
    tag = hashlib.sha256(" ".join(REQUIREMENTS).encode()).hexdigest()[:8]
    return Path(base) / "venvs" / f"transformers-4.46-torch-{torch_version}-{tag}"


def transformers4_python() -> Path:
    """The python of the transformers 4.46 environment, built on first use (about a minute)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    if (venv / _MARKER).is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first, the version this environment runs: a bare requirement would pull a CUDA build.
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    (venv / _MARKER).write_text("")
    return python


def run_check(
    python: Path, export: Path, prompt: str, inputs: dict[str, torch.Tensor], workdir: Path
) -> tuple[dict, dict[str, torch.Tensor]]:
    """`tests/transformers4_check.py` on `export` under `python`: (its JSON report, its output
    tensors). `inputs`: `input_ids` `[1, S]` for the LLM and `pixel_values` for the tower."""
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, workdir / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [str(python), str(CHECK_SCRIPT), str(export), prompt, str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    if done.returncode != 0:
        raise AssertionError(f"transformers 4.46 failed on {export}:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, load_file(workdir / "outputs.safetensors")


def assert_export_loads_in_4_and_5(python: Path, export: Path, workdir: Path) -> dict:
    """`export` (an mcore-to-hf output) loads unedited in transformers 4.46 (`python`) and in
    this environment's 5.x: the tokenizer class resolves, the chat template is inline and gives
    this project's prompt ids, the media tokens are special and present (VILA adds nothing), and
    the decoder and tower load with no missing or unexpected tensor and compute what 5.x
    computes from the same files (fp32, 1e-5 relative). Returns the 4.46 report."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM, SiglipVisionModel

    from longvila_mcore.data.chat import render_prompt
    from longvila_mcore.data.tokenizer import MEDIA_TOKENS, VIDEO_TOKEN

    prompt = "What colour is the shape?"
    tokenizer = AutoTokenizer.from_pretrained(export / "llm")  # transformers 5
    ids = render_prompt(tokenizer, prompt, ["video"])
    size = json.loads((export / "vision_tower" / "config.json").read_text())["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixels}
    report, outputs = run_check(python, export, prompt, inputs, workdir)

    assert report["transformers"] == TRANSFORMERS.split("==")[1]
    assert report["inline_chat_template"] and not (export / "llm" / "chat_template.jinja").exists()
    assert report["prompt_ids"] == ids
    assert report["grew"] == 0
    vocab = tokenizer.get_vocab()
    assert {t: m["id"] for t, m in report["media"].items()} == {t: vocab[t] for t in MEDIA_TOKENS}
    assert all(m["special"] for m in report["media"].values())
    assert report["media"][VIDEO_TOKEN]["id"] in ids
    assert report["llm_loading"] == {} and report["tower_loading"] == {}
    assert report["projector_tensors"] == [
        f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("bias", "weight")
    ]

    llm = Qwen2ForCausalLM.from_pretrained(export / "llm", dtype=torch.float32)
    tower = SiglipVisionModel.from_pretrained(export / "vision_tower", dtype=torch.float32)
    select = json.loads((export / "config.json").read_text())["mm_vision_select_layer"]
    with torch.no_grad():
        logits = llm(input_ids=inputs["input_ids"]).logits
        features = tower(pixels, output_hidden_states=True).hidden_states[select]
    for name, expected in (("logits", logits), ("features", features)):
        got = outputs[name]
        assert got.shape == expected.shape, name
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), name
    return report
