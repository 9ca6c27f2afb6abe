"""Checkpoint conversion (tools/convert_checkpoint.py): VILA-layout HF <-> our Megatron checkpoints.

Two tiny HF checkpoints written by transformers' own classes: "untied" (bf16 like the releases,
linear RoPE scaling in the transformers 4.x spelling, SigLIP head, a tokenizer without the media
tokens, so the embeddings grow) and "tied" (fp32, tied embeddings, the released tokenizer). The
spawned conversions are made once (fixture `converted`) and shared by the slow tests.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, SiglipVisionConfig

from longvila_mcore.checkpoint import convert, hf_export
from longvila_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
from longvila_mcore.checkpoint.dist import INCOMPLETE, load_checkpoint, read_model_config
from longvila_mcore.checkpoint.hf import load_vila, read_config_and_tokenizer, tokenizer_files
from longvila_mcore.checkpoint.tensors import CheckpointError
from longvila_mcore.config import ModelConfig, ParallelConfig
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.media import load_video
from longvila_mcore.data.tokenizer import IM_END, train_tokenizer
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.runtime import init_model_parallel
from tests.hf_reference import (
    HFLongVILA,
    cast_vila_checkpoint,
    make_vila_checkpoint,
    tiny_llm_config,
    tiny_vision_config,
    tokenizer_without_media_tokens,
    vila_tensors,
)
from tests.multiproc import run_ranks
from tests.test_data_media import lossless_video
from tests.transformers4 import assert_export_loads_in_4_and_5

TEXTS = ["What colour is the shape? The shape is red.", "A blue circle moves left.\n" * 3] * 20
PROMPT = "What colour is the shape?"
CLI = Path(__file__).parents[1] / "tools" / "convert_checkpoint.py"
CPU = torch.device("cpu")


# In-process conversions start a one-process group, whose rendezvous runtime.init_distributed
# records in os.environ: a subprocess inheriting it would try to serve the same port.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLI), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tokenizer"))


def make_untied(root: Path, tokenizer_dir: Path) -> Path:
    plain = tokenizer_without_media_tokens(tokenizer_dir, root.with_name(root.name + "_tokenizer"))
    llm = tiny_llm_config(vocab_size=297, rope_scaling_factor=4.0)  # = the plain tokenizer
    vision = tiny_vision_config(use_head=True)
    root = make_vila_checkpoint(root, plain, llm, vision, transformers4_rope=True)
    return cast_vila_checkpoint(root, torch.bfloat16)


def make_tied(root: Path, tokenizer_dir: Path) -> Path:
    llm = tiny_llm_config(vocab_size=320, tie_word_embeddings=True)
    root = make_vila_checkpoint(root, tokenizer_dir, llm, tiny_vision_config(), seed=1)
    top = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(top | {"num_video_frames": 5}))
    return root


@dataclasses.dataclass
class Converted:
    untied: Path
    tied: Path
    untied_tp2: Path
    untied_pp2: Path
    """Written by one tensor-parallel rank (two pipeline stages): the TP 1 checkpoint."""
    tied_tp2: Path
    """Written through the CLI."""
    tied_pp2: Path
    """The last stage holds its own copy of the tied embedding."""


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir) -> Converted:
    root = tmp_path_factory.mktemp("convert")
    untied = make_untied(root / "untied", tokenizer_dir)
    tied = make_tied(root / "tied", tokenizer_dir)
    hf_to_mcore(untied, root / "untied_tp2", tp=2)
    hf_to_mcore(untied, root / "untied_pp2", tp=1, pp=2)
    done = run_cli("hf-to-mcore", "--hf", str(tied), "--out", str(root / "tied_tp2"), "--tp", "2")
    assert done.returncode == 0, done.stderr
    hf_to_mcore(tied, root / "tied_pp2", tp=1, pp=2)
    return Converted(
        untied,
        tied,
        root / "untied_tp2",
        root / "untied_pp2",
        root / "tied_tp2",
        root / "tied_pp2",
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def assert_same_tensors(original: Path, exported: Path, grown_rows: int) -> None:
    before, after = vila_tensors(original), vila_tensors(exported)
    assert set(after) == set(before)
    for name, tensor in before.items():
        got = after[name]
        assert got.dtype == tensor.dtype, name
        if name in ("llm/model.embed_tokens.weight", "llm/lm_head.weight") and grown_rows:
            # The media tokens the tokenizer lacked: new rows, zero.
            assert got.shape[0] == tensor.shape[0] + grown_rows
            assert not got[tensor.shape[0] :].any()
            got = got[: tensor.shape[0]]
        assert torch.equal(bits(got), bits(tensor)), name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_configs(original: Path, exported: Path) -> None:
    expected, _, original_media = read_config_and_tokenizer(original)
    got, _, media = read_config_and_tokenizer(exported)
    assert not media.added  # a grown vocabulary comes back with its tokens
    assert dataclasses.replace(got, name="") == dataclasses.replace(expected, name="")

    top_before, top = read_json(original / "config.json"), read_json(exported / "config.json")
    assert {k: top[k] for k in top_before} == top_before  # every released field is kept
    assert top["llm_cfg"] == read_json(exported / "llm" / "config.json")
    assert top["vision_tower_cfg"] == read_json(exported / "vision_tower" / "config.json")
    assert top["mm_projector_cfg"] == read_json(exported / "mm_projector" / "config.json")
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"

    # As transformers (5) reads them.
    llm_before = Qwen2Config.from_pretrained(original / "llm")
    llm = Qwen2Config.from_pretrained(exported / "llm")
    assert "rope_parameters" not in read_json(exported / "llm" / "config.json")  # 4.x spelling
    for key in (
        "rope_parameters",
        "tie_word_embeddings",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "dtype",
    ):
        assert getattr(llm, key) == getattr(llm_before, key), key
    assert llm.vocab_size == got.llm.vocab_size
    tower_before = SiglipVisionConfig.from_pretrained(original / "vision_tower")
    tower = SiglipVisionConfig.from_pretrained(exported / "vision_tower")
    assert tower.to_diff_dict() == tower_before.to_diff_dict()
    preprocessor = read_json(exported / "vision_tower" / "preprocessor_config.json")
    assert preprocessor | read_json(original / "vision_tower" / "preprocessor_config.json") == (
        preprocessor
    )
    if not original_media.added:  # the released tokenizer, its config in the releases' form
        for file in tokenizer_files(original):
            if file.name not in ("tokenizer_config.json", "chat_template.jinja"):
                assert (exported / "llm" / file.name).read_bytes() == file.read_bytes()
        before = AutoTokenizer.from_pretrained(original / "llm")
        after = AutoTokenizer.from_pretrained(exported / "llm")
        assert after.get_vocab() == before.get_vocab()
        assert after.chat_template == before.chat_template
        assert render_prompt(after, PROMPT) == render_prompt(before, PROMPT)


def assert_same_outputs(original: Path, exported: Path) -> None:
    """transformers' own classes on both directories: identical tower + projector tokens and
    identical logits (over the original vocabulary)."""
    before, after = HFLongVILA(original), HFLongVILA(exported)
    size = before.tower.config.image_size
    frames = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(before.frame_tokens(frames), after.frame_tokens(frames))
        ids = AutoTokenizer.from_pretrained(original / "llm")(PROMPT, return_tensors="pt")
        expected = before.llm(input_ids=ids.input_ids).logits
        got = after.llm(input_ids=ids.input_ids).logits
    assert torch.equal(got[..., : expected.shape[-1]], expected)


@pytest.mark.slow
def test_round_trip_is_bit_identical(converted, tmp_path, monkeypatch):
    # Batches of a few tensors: a stacked layer tensor is read over several loads.
    monkeypatch.setattr(convert, "LOAD_BATCH_BYTES", 20_000)
    cases = [
        ("untied_tp2", converted.untied, converted.untied_tp2, 3, hf_export.MAX_SHARD_BYTES),
        # llm/ and vision_tower/ in several files (mm_projector/ fits in one)
        ("untied_pp2", converted.untied, converted.untied_pp2, 3, 30_000),
        ("tied_tp2", converted.tied, converted.tied_tp2, 0, hf_export.MAX_SHARD_BYTES),
        ("tied_pp2", converted.tied, converted.tied_pp2, 0, hf_export.MAX_SHARD_BYTES),
    ]
    for name, original, mcore_dir, grown_rows, max_shard_bytes in cases:
        exported = mcore_to_hf(mcore_dir, tmp_path / name, max_shard_bytes=max_shard_bytes)
        assert_same_tensors(original, exported, grown_rows)
        assert_same_configs(original, exported)
        assert_same_outputs(original, exported)
    for component in ("llm", "vision_tower"):
        files = sorted(p.name for p in (tmp_path / "untied_pp2" / component).glob("model*"))
        assert len(files) > 2 and "model.safetensors.index.json" in files

    # A checkpoint that never was an HF one (no "hf" in longvila.json) gets the releases'
    # defaults, and its dtype from its tensors (norms are float32 in a bf16 Megatron model).
    scratch = tmp_path / "scratch"
    shutil.copytree(converted.untied_tp2, scratch)
    meta = read_json(scratch / "longvila.json")
    del meta["hf"]
    (scratch / "longvila.json").write_text(json.dumps(meta))
    exported = mcore_to_hf(scratch, tmp_path / "scratch_hf")
    assert_same_tensors(converted.untied, exported, grown_rows=3)
    got = read_config_and_tokenizer(exported)[0]
    assert dataclasses.replace(got, name="") == dataclasses.replace(
        read_model_config(scratch), name=""
    )
    assert read_json(exported / "config.json")["num_video_frames"] == 8
    assert_same_outputs(converted.untied, exported)


@pytest.mark.slow
def test_exports_load_in_transformers_446_and_5(converted, transformers4, tmp_path):
    """mcore-to-hf of converted checkpoints (the tokenizer as released, and one to which the
    media tokens were added, saved by transformers 5) load unedited in VILA's transformers 4.46
    and in 5.x (tests/transformers4.py says what is checked)."""
    for name in ("untied_tp2", "tied_tp2"):
        export = mcore_to_hf(getattr(converted, name), tmp_path / name)
        report = assert_export_loads_in_4_and_5(transformers4, export, tmp_path / f"{name}_4.46")
        # the class transformers 5 saved under, or its 4.x name for TokenizersBackend
        assert report["config_tokenizer_class"] in ("PreTrainedTokenizerFast", "Qwen2Tokenizer")
        assert report["tokenizer_class"].endswith("Fast"), name  # VILA asks for use_fast=True
        assert report["projector_config"]["token_order"] == "raster", name


def _load_both_ways(mcore_dir: str, hf_dir: str) -> int:
    parallel = ParallelConfig(tp=2)
    init_model_parallel(parallel)
    resharded = LongVILAModel(read_model_config(mcore_dir), parallel, CPU, initialize=False)
    load_checkpoint(mcore_dir, resharded)
    direct, _ = load_vila(hf_dir, parallel, CPU, torch.float32)
    ours, reference = dict(resharded.named_parameters()), dict(direct.named_parameters())
    assert ours.keys() == reference.keys()
    for name, param in ours.items():
        assert torch.equal(param, reference[name]), name
    return len(ours)


@pytest.mark.slow
def test_tp1_checkpoint_reshards_to_tp2(converted):
    """The TP 1 (PP 2) bf16 checkpoint loaded into a TP 2 fp32 model: the same tensors as the HF
    checkpoint loaded directly into TP 2."""
    assert run_ranks(2, _load_both_ways, str(converted.untied_pp2), str(converted.untied)) > 50


@pytest.mark.slow
def test_generate_runs_converted_checkpoint(converted, tmp_path):
    """`generate --load` on the Megatron checkpoint (written by TP 2, run by one process) gives
    HF's greedy tokens on the original; the frame count is the carried num_video_frames (5)."""
    vision = read_model_config(converted.tied_tp2).vision
    pixels = np.random.default_rng(0).integers(
        0, 256, (12, vision.image_size, vision.image_size, 3), dtype=np.uint8
    )
    video = tmp_path / "clip.mkv"
    video.write_bytes(lossless_video(pixels, rate=4))
    done = subprocess.run(
        [sys.executable, "-m", "longvila_mcore.generate", "--load", str(converted.tied_tp2)]
        + ["--video", str(video), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    reference = HFLongVILA(converted.tied)
    tokenizer = AutoTokenizer.from_pretrained(converted.tied / "llm")
    frames = load_video(video, 5, vision)
    layout = MediaLayout.from_tokenizer(
        tokenizer, read_model_config(converted.tied_tp2).tokens_per_frame
    )
    prompt = layout.expand(render_prompt(tokenizer, PROMPT, ["video"]), [frames.shape[0]])
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    expected = reference.greedy(prompt.input_ids, prompt.media_index, frames, 12, eos)
    assert result["token_ids"] == expected


def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(read_json(path) | changes))


@pytest.mark.slow
def test_malformed_megatron_checkpoints_are_refused(converted, tmp_path):
    def refused(name: str, edit) -> str:
        src = edited_copy(converted.untied_tp2, tmp_path / name, edit)
        with pytest.raises(CheckpointError) as err:
            mcore_to_hf(src, tmp_path / f"{name}_hf")
        assert not (tmp_path / f"{name}_hf").exists()
        return str(err.value)

    def model(**llm_or_vision):
        def edit(root: Path):
            meta = read_json(root / "longvila.json")
            for part, changes in llm_or_vision.items():
                meta["model"][part] |= changes
            (root / "longvila.json").write_text(json.dumps(meta))

        return edit

    msg = refused("head", model(vision={"use_head": False}))  # the checkpoint has one
    assert "vision_tower.head." in msg and "does not have" in msg
    assert "llm.decoder.layers.mlp.linear_fc1.weight" in refused(
        "ffn", model(llm={"ffn_hidden_size": 80})
    )
    msg = refused("layers", model(llm={"num_layers": 1}))
    assert "llm.decoder.layers." in msg and "2 layers" in msg

    def no_output_layer(root: Path):
        model(llm={"tie_word_embeddings": True})(root)

    msg = refused("tied", no_output_layer)
    assert "llm.output_layer.weight" in msg

    def projector(root: Path):
        meta = read_json(root / "longvila.json")
        meta["model"]["projector_type"] = "mlp2x_gelu"
        (root / "longvila.json").write_text(json.dumps(meta))

    assert "mlp2x_gelu" in refused("projector", projector)

    def missing_layer(root: Path):
        model(vision={"num_layers": 4})(root)

    assert "vision_tower.encoder.layers." in refused("missing", missing_layer)


def test_malformed_hf_checkpoints_are_refused(single_rank, tmp_path, tokenizer_dir):
    """Everything is checked before any rank starts: these fail in a fraction of a second."""
    good = make_vila_checkpoint(
        tmp_path / "good", tokenizer_dir, tiny_llm_config(vocab_size=320), tiny_vision_config()
    )

    def refused(name: str, edit, **kwargs) -> str:
        root = edited_copy(good, tmp_path / name, edit)
        with pytest.raises(CheckpointError) as err:
            hf_to_mcore(root, tmp_path / f"{name}_out", **kwargs)
        assert not (tmp_path / f"{name}_out").exists()
        assert not (tmp_path / f"{name}_out{INCOMPLETE}").exists()
        return str(err.value)

    def edit_tensors(component: str, change):
        from safetensors.torch import load_file, save_file

        def edit(root: Path):
            path = root / component / "model.safetensors"
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, path, {"format": "pt"})

        return edit

    msg = refused(
        "missing", edit_tensors("llm", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    )
    assert "model.layers.1.mlp.up_proj.weight" in msg

    def extra(tensors):
        tensors["layers.3.weight"] = torch.zeros(4)

    assert "layers.3.weight" in refused("unexpected", edit_tensors("mm_projector", extra))

    def narrow_k(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 64)

    msg = refused("qkv_shape", edit_tensors("llm", narrow_k))
    assert "model.layers.0.self_attn.k_proj.weight (24, 64)" in msg

    def wide_norm(tensors):
        tensors["model.norm.weight"] = torch.ones(65)

    msg = refused("norm_shape", edit_tensors("llm", wide_norm))
    assert "model.norm.weight (65,)" in msg and "llm.decoder.final_layernorm.weight" in msg

    def projector(root: Path):
        edit_json(root / "mm_projector" / "config.json", mm_projector_type="mlp2x_gelu")

    assert "mlp2x_gelu" in refused("projector", projector)
    assert "tp 3" in refused("tp", lambda root: None, tp=3)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="taken"):
        hf_to_mcore(good, tmp_path / "taken")


@pytest.mark.slow
def test_cli_reports_errors_in_one_line(converted, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    done = run_cli(
        "mcore-to-hf", "--mcore", str(converted.tied_tp2), "--out", str(tmp_path / "taken")
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
    assert "taken" in done.stderr


def interrupt_when_exists(path: Path) -> list[psutil.Process]:
    """Ctrl-C for this process once `path` appears; returns the processes alive then, except
    those that were already running."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = []

    def watch():
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        started.extend(p for p in psutil.Process().children(recursive=True) if p.pid not in before)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return started


@pytest.mark.slow
def test_interrupted_conversions_leave_nothing(converted, tmp_path, monkeypatch):
    # Ctrl-C while the ranks write: the ranks and the processes they started are stopped, and
    # the temporary directory is removed.
    out = tmp_path / "interrupted"
    started = interrupt_when_exists(tmp_path / f"interrupted{INCOMPLETE}")
    with pytest.raises(KeyboardInterrupt):
        hf_to_mcore(converted.tied, out, tp=2)
    assert started, "the conversion never started writing"
    assert not out.exists() and not (tmp_path / f"interrupted{INCOMPLETE}").exists()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive

    # mcore-to-hf stopped while it writes its first file.
    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export.SafetensorsFiles, "_flush", interrupt)
    with pytest.raises(KeyboardInterrupt):
        mcore_to_hf(converted.tied_tp2, tmp_path / "stopped")
    assert not (tmp_path / "stopped").exists()
    assert not (tmp_path / f"stopped{INCOMPLETE}").exists()


def test_hf_configs_keep_a_nested_siglip_config():
    """A tower saved with a full SiglipConfig (the reader takes its `vision_config`) keeps that
    form, with the model's values."""
    cfg = ModelConfig(
        llm=tiny_llm_config(), vision=tiny_vision_config(image_size=32, use_head=True)
    )
    carried = {"vision_tower": {"model_type": "siglip", "vision_config": {"image_size": 16}}}
    dtypes = dict.fromkeys(("llm", "vision_tower", "mm_projector"), torch.bfloat16)
    tower = hf_export.hf_configs(cfg, carried, dtypes)["vision_tower"]
    assert tower["model_type"] == "siglip" and tower["torch_dtype"] == "bfloat16"
    assert tower["vision_config"]["image_size"] == 32 and tower["vision_config"]["vision_use_head"]
    assert "image_size" not in tower


def test_checkpoints_without_a_recorded_token_order(caplog):
    """longvila.json written before the order was recorded: a trained checkpoint is taken as
    legacy (the code's order then), a converted one as raster (the releases' weights), each with
    a warning; a recorded order is used as it is, and an explicit one wins over it."""
    from longvila_mcore.checkpoint.dist import model_config
    from longvila_mcore.config import with_token_order

    recorded = dataclasses.asdict(ModelConfig())
    old = {k: v for k, v in recorded.items() if k != "token_order"}
    with caplog.at_level("WARNING"):
        assert model_config({"model": old, "stage": "3_sft"}, "trained").token_order == "legacy"
        assert model_config({"model": old, "hf": {}}, "converted").token_order == "raster"
    assert [r.getMessage().split(" records")[0] for r in caplog.records] == ["trained", "converted"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        meta = {"model": recorded | {"token_order": "legacy"}, "stage": "3_sft"}
        assert model_config(meta, "new").token_order == "legacy"
    assert not caplog.records
    cfg = model_config(meta, "new")
    assert with_token_order(cfg, None, "new") is cfg
    assert with_token_order(cfg, "raster", "new").token_order == "raster"
