"""The training entry point, run for real on the tiny model and the synthetic data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longvila_mcore.config import Config, model_preset
from longvila_mcore.train import STAGES

REPO = Path(__file__).resolve().parents[1]
# Steps of 8 samples at a constant learning rate, so a 3-step run follows the first 3 steps of
# the 6-step reference run exactly.
BASE = ["train.global_batch_size=8", "train.micro_batch_size=4", "stage.lr_schedule=constant"]
REFERENCE = ["train.max_steps=6", "checkpoint.save_interval=3"]
STAGE = "+stage=5_sft_256f"


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    """This process's environment minus any process-group variables (pytest itself may run
    under a launcher), so each run forms its own group."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(output_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_free_port()),
        ]
        if nproc > 1
        else [sys.executable]
    )
    if not any(o.startswith("+stage=") for o in overrides):
        overrides = (STAGE, *overrides)
    module = ["-m", "longvila_mcore.train", *BASE, f"run.output_dir={output_dir}"]
    return [*launcher, *module, *overrides]


def run_train(output_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    done = subprocess.run(
        train_command(output_dir, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(output_dir: Path) -> dict[int, float]:
    """Loss per step; a step executed twice (before and after a crash) keeps its last value."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def grad_norms(output_dir: Path) -> dict[int, float]:
    """Gradient norm (before clipping) per step, as `losses`."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["grad_norm"] for r in map(json.loads, lines)}


def close(a: dict[int, float], b: dict[int, float], steps, rel: float) -> bool:
    return all(abs(a[s] - b[s]) <= rel * abs(b[s]) for s in steps)


def same_steps(out: Path, reference: Path, steps, rel: float) -> None:
    """Loss AND gradient norm of `out`'s steps within `rel` of the reference run's: the loss
    alone misses a gradient scaled by a constant (clipping and Adam undo it)."""
    for name, read in (("loss", losses), ("grad_norm", grad_norms)):
        got, want = read(out), read(reference)
        assert close(got, want, steps, rel), (name, got, want)


# --- configuration --------------------------------------------------------------------------


def test_every_stage_composes():
    assert len(STAGES) == 11
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        for stage in STAGES:
            cfg = compose("config", overrides=[f"+stage={stage}"])
            config: Config = OmegaConf.to_object(cfg)
            config.stage.check()
            assert config.stage.name == stage
    assert config.model == model_preset("longvila_tiny") and config.data.name == "synthetic"
    assert model_preset("longvila_7b").tokens_per_frame == 196  # 27 x 27 patches -> 14 x 14


def test_the_tiny_model_brings_its_recipe_and_overrides_win():
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        tiny = OmegaConf.to_object(compose("config", overrides=["+stage=5_sft_1024f"]))
        large = OmegaConf.to_object(
            compose("config", overrides=["+stage=5_sft_1024f", "model=longvila_1.5b"])
        )
        mine = OmegaConf.to_object(
            compose("config", overrides=["+stage=5_sft_1024f", "train.max_steps=5"])
        )
    assert (tiny.train.lr_scale, tiny.train.max_steps, tiny.train.global_batch_size) == (
        80,
        1200,
        16,
    )
    assert tiny.data.num_workers == 1
    assert (large.train.lr_scale, large.train.max_steps, large.train.global_batch_size) == (
        1,
        200,
        8,
    )
    assert (mine.train.max_steps, mine.train.lr_scale) == (5, 80)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+stage=6_unknown", "stage/6_unknown"),
        ("train.max_stepz=3", "max_stepz"),
        ("train.max_steps=abc", "max_steps"),
        ("train.lr_scale=0", "train.lr_scale=0.0 must be > 0"),
        ("train.recompute=some", "train.recompute='some'"),
    ],
)
def test_bad_override_is_one_clear_error(tmp_path, override, message):
    args = [sys.executable, "-m", "longvila_mcore.train", override]
    if not override.startswith("+stage"):
        args.insert(3, "+stage=3_sft")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_stage_names_the_choices(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "longvila_mcore.train"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "+stage=<name>" in done.stderr and "5_sft_1024f" in done.stderr


# --- freezing per stage ---------------------------------------------------------------------


def _model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    model = {k: v for k, v in meta.items() if not k.startswith("optimizer")}
    loaded = dist_checkpointing.load(model, str(checkpoint))
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _parts_changed(before: dict, after: dict) -> dict[str, bool]:
    changed = {"vision_tower": False, "mm_projector": False, "llm": False}
    for key, tensor in before.items():
        if not torch.equal(tensor, after[key]):
            changed[key.split(".")[0]] = True
    return changed


@pytest.mark.slow
def test_stage1_trains_only_the_projector_and_stage4_only_the_llm(tmp_path, single_rank):
    start = tmp_path / "start"
    run_train(start, "+stage=3_sft", "train.max_steps=1")
    ckpt = start / "checkpoints" / "step_0000001"
    before = _model_tensors(ckpt)
    # Stage 3 samples videos to 8 frames; text-only stage 4 keeps what the start was trained on.
    assert json.loads((ckpt / "longvila.json").read_text())["trained_frames"] == 8
    for stage, learns in (("1_align", {"mm_projector"}), ("4_extend_llm_64k", {"llm"})):
        out = tmp_path / stage
        run_train(out, f"+stage={stage}", "train.max_steps=2", f"checkpoint.load={ckpt}")
        after = _model_tensors(out / "checkpoints" / "step_0000002")
        changed = _parts_changed(before, after)
        assert {part for part, c in changed.items() if c} == learns, (stage, changed)
    meta = json.loads(
        (tmp_path / "4_extend_llm_64k/checkpoints/step_0000002/longvila.json").read_text()
    )
    assert meta["model"]["llm"]["rope_theta"] == 15_300_000  # stage 4 raised RoPE theta
    assert meta["trained_frames"] == 8


# --- layouts give the same losses -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The output directory of an uninterrupted one-process run of 6 steps."""
    out = tmp_path_factory.mktemp("reference")
    run_train(out, *REFERENCE)
    return out


# Between the tiny recipe's gradient norms of steps 1-3 (about 3.45, 4.29, 3.26): clipping is
# active at step 2 only, so the clipped and the unclipped update are both compared.
CLIP = ["train.max_steps=3", "train.clip_grad=3.7"]


@pytest.fixture(scope="module")
def clipped(tmp_path_factory) -> Path:
    """The output directory of a one-process run of 3 steps clipped at step 2 only."""
    out = tmp_path_factory.mktemp("clipped")
    run_train(out, *CLIP)
    norms = grad_norms(out)
    assert norms[1] < 3.7 < norms[2] and norms[3] < 3.7, norms
    return out


@pytest.mark.slow
def test_parallel_layouts_match_one_process(tmp_path, reference):
    """Same global batch, same per-step loss and gradient norm. dp 2 x ulysses 2 shards the
    distributed optimizer over 4 ranks (dp x sp); tp 2 (with sequence parallelism) counts each
    tensor-parallel shard of the gradient once."""
    steps = ["train.max_steps=3"]
    for name, overrides, nproc in (
        ("tp2_u2", ["parallel.tp=2", "parallel.ulysses=2"], 4),
        ("u2_r2", ["parallel.ulysses=2", "parallel.ring=2"], 4),
        ("dp2_u2", ["parallel.ulysses=2"], 4),
    ):
        out = tmp_path / name
        run_train(out, *steps, *overrides, nproc=nproc)
        same_steps(out, reference, range(1, 4), 1e-5)


@pytest.mark.slow
def test_pipeline_layouts_match_one_process(tmp_path, clipped):
    """pp 2 (the tower, projector and sharder on the first stage, the loss on the last) and
    pp 2 x ulysses 2, then stage 4 (text only, the frozen tower on the first stage) at pp 2:
    per-step loss and gradient norm within 1e-5 of one process, clipped at step 2 only."""
    for name, overrides, nproc in (
        ("pp2", ["parallel.pp=2"], 2),
        ("pp2_u2", ["parallel.pp=2", "parallel.ulysses=2"], 4),
    ):
        out = tmp_path / name
        run_train(out, *CLIP, *overrides, nproc=nproc)
        same_steps(out, clipped, range(1, 4), 1e-5)

    text = ["+stage=4_extend_llm_64k", "train.max_steps=3"]
    run_train(tmp_path / "text_one", *text)
    run_train(tmp_path / "text_pp2", *text, "parallel.pp=2", nproc=2)
    same_steps(tmp_path / "text_pp2", tmp_path / "text_one", range(1, 4), 1e-5)


@pytest.mark.slow
def test_pipeline_checkpoints_resume_under_any_pipeline_layout(tmp_path, reference):
    """Saved at pp 2 after step 3, resumed at pp 2 (the distributed optimizer, which resumes
    under its own layout) and at pp 1 (the optimizer state of `distributed_optimizer=false`
    reshards); saved at pp 1, resumed at pp 2: steps 4-6 as the uninterrupted one-process run.
    The layers' global numbers, not each stage's own, name the saved tensors."""
    first, rest = [*REFERENCE[1:], "train.max_steps=3"], REFERENCE
    runs = {
        "pp2_pp2": ([], 2, 2),
        "pp2_pp1": (["train.distributed_optimizer=false"], 2, 1),
        "pp1_pp2": (["train.distributed_optimizer=false"], 1, 2),
    }
    for name, (extra, before, after) in runs.items():
        out = tmp_path / name
        run_train(out, *first, *extra, f"parallel.pp={before}", nproc=before)
        run_train(out, *rest, *extra, f"parallel.pp={after}", nproc=after)
        same_steps(out, reference, range(1, 7), 1e-5)


@pytest.mark.slow
def test_tensor_parallel_with_sequence_parallelism_matches_one_process(tmp_path, clipped):
    """tp 2 with Megatron's sequence parallelism (on by default): the decoder's norms see half
    of the tokens on each rank, so their gradients must be summed over the tensor-parallel
    ranks and counted once in the norm. Clipping is active at step 2 only, so both the clipped
    and the unclipped update are compared."""
    ours = tmp_path / "tp2_sp"
    run_train(ours, *CLIP, "parallel.tp=2", nproc=2)
    same_steps(ours, clipped, range(1, 4), 1e-5)


@pytest.mark.slow
def test_recompute_matches_one_process(tmp_path, reference):
    """train.recompute=full (every layer, and the first only) and selective: per-step loss and
    grad_norm of 2 steps as without recomputation (the reference run's first 2 steps)."""

    def metrics(out: Path) -> list[tuple[float, float]]:
        records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [(r["loss"], r["grad_norm"]) for r in records if r["step"] <= 2]

    none = metrics(reference)
    for name, overrides in (
        ("full", ["train.recompute=full"]),
        ("full_1", ["train.recompute=full", "train.recompute_num_layers=1"]),
        ("selective", ["train.recompute=selective"]),
    ):
        run_train(tmp_path / name, "train.max_steps=2", *overrides)
        ours = metrics(tmp_path / name)
        assert len(ours) == len(none) == 2 and all(
            abs(a - b) <= 1e-6 * abs(b) for step, ref in zip(ours, none) for a, b in zip(step, ref)
        ), (name, ours, none)


@pytest.mark.slow
def test_two_node_data_parallel_launch_matches_one_process(tmp_path, reference, single_rank):
    """`launch/torchrun.sh` on two "nodes" of one process each (gloo over loopback): data
    parallel 2 with the distributed optimizer (the default) and the same global batch gives
    the one-process losses and gradient norms, also after stopping at step 3 and resuming
    (each rank saved and reloads only its shard of the optimizer state). The checkpoint's
    weights are the one-process run's: each rank updates only its shard, so the others'
    updates are gathered before saving."""
    out = tmp_path / "two_nodes"
    for max_steps in (3, 6):
        port = str(_free_port())
        args = [STAGE, *BASE, f"run.output_dir={out}", f"train.max_steps={max_steps}"]
        nodes = [
            subprocess.Popen(
                ["bash", str(REPO / "launch" / "torchrun.sh"), *args],
                env={
                    **_env(),
                    "NNODES": "2",
                    "NODE_RANK": str(rank),
                    "NPROC_PER_NODE": "1",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                },
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in (0, 1)
        ]
        for node in nodes:
            output, _ = node.communicate(timeout=600)
            assert node.returncode == 0, output[-4000:]
    same_steps(out, reference, range(1, 7), 1e-5)
    final = "checkpoints/step_0000006"
    ours, theirs = _model_tensors(out / final), _model_tensors(reference / final)
    assert ours.keys() == theirs.keys()
    # One step moves weights by about the learning rate (8e-4 in the tiny recipe); dp 2 and one
    # process differ by 1e-6 at most after 6 steps, a stale shard by a whole step.
    for key, tensor in ours.items():
        assert torch.allclose(tensor, theirs[key], rtol=0, atol=1e-5), key


# --- exact resume -----------------------------------------------------------------------------


def _kill_when(path_exists: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path_exists.exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{path_exists} never appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its checkpoint-writer helpers, like a crash
    proc.wait()


@pytest.mark.slow
def test_resume_after_stop_and_after_kill_during_save(tmp_path, reference):
    """Checkpoints are written asynchronously (the default)."""
    run = REFERENCE

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            train_command(out, *run),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
            start_new_session=True,
        )

    # Stopped (kill -9) once step 3's checkpoint is complete, then started again.
    stopped = tmp_path / "stopped"
    _kill_when(stopped / "checkpoints" / "step_0000003" / "longvila.json", start(stopped))
    run_train(stopped, *run)
    same_steps(stopped, reference, range(4, 7), 1e-6)

    # Killed in the middle of writing step 6's checkpoint: step 3's is used, the broken one
    # ignored (and cleaned up by the next save).
    crashed = tmp_path / "crashed"
    _kill_when(crashed / "checkpoints" / "step_0000006.incomplete", start(crashed))
    assert (crashed / "checkpoints" / "step_0000003" / "longvila.json").is_file()
    run_train(crashed, *run)
    same_steps(crashed, reference, range(4, 7), 1e-6)
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000006"]

    # Killed while step 4's asynchronous save is still writing (steps go on meanwhile): step 2's
    # checkpoint is intact and the run continues from it.
    run = [*REFERENCE, "checkpoint.save_interval=2"]
    in_flight = tmp_path / "in_flight"
    _kill_when(in_flight / "checkpoints" / "step_0000004.incomplete", start(in_flight))
    assert not (in_flight / "checkpoints" / "step_0000004").exists()
    run_train(in_flight, *run)
    same_steps(in_flight, reference, range(3, 7), 1e-6)


def _start(out: Path, command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        cwd=REPO,
        start_new_session=True,
    )


def _signal_after_first_step(out: Path, proc: subprocess.Popen, sig: signal.Signals) -> int:
    """Send `sig` to the run's whole process group (as Slurm signals every process of a job)
    once its first step is logged; returns its exit status."""
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]
    return proc.returncode


@pytest.mark.slow
def test_a_signal_saves_and_exits_75_and_the_requeued_run_continues_exactly(tmp_path, reference):
    """SIGTERM to `python -m longvila_mcore.train` (saving synchronously), and SIGUSR1 (Slurm's --signal) to
    launch/torchrun.sh and its workers: the step in progress finishes, a checkpoint of it is
    saved, the exit status is 75; running the same command again gives the uninterrupted run's
    loss and gradient norm at every step."""
    from longvila_mcore.checkpoint.resume import latest_checkpoint

    term = tmp_path / "sigterm"
    sync = [*REFERENCE, "checkpoint.async_save=false"]  # the blocking save
    _signal_after_first_step(term, _start(term, train_command(term, *sync)), signal.SIGTERM)
    usr1 = tmp_path / "sigusr1"
    launcher = ["bash", str(REPO / "launch" / "torchrun.sh"), STAGE, *BASE, *REFERENCE]
    env = {
        **_env(),
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    _signal_after_first_step(
        usr1, _start(usr1, [*launcher, f"run.output_dir={usr1}"], env), signal.SIGUSR1
    )
    for out in (term, usr1):
        stopped_at = int(latest_checkpoint(out).name.split("_")[1])
        assert 1 <= stopped_at < 6, out
        run_train(out, *REFERENCE)
        same_steps(out, reference, range(1, 7), 1e-6)


def test_save_triggers_interval_minutes_and_signals(single_rank):
    from longvila_mcore.train import SaveTriggers

    config = Config()
    config.train.max_steps = 10
    config.checkpoint.save_interval = 4
    config.checkpoint.save_interval_minutes = 0
    triggers = SaveTriggers(config, torch.device("cpu"))
    try:
        assert [triggers.after(step) for step in (1, 4, 10)] == [
            (False, False),
            (True, False),
            (True, False),
        ]
        triggers.seconds = 1e-9  # a save is due by the clock
        assert triggers.after(1) == (True, False)
        triggers.seconds = 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert triggers.after(1) == (True, True) and triggers.signal == "SIGUSR1"
    finally:
        triggers.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.mark.slow
def test_resume_under_another_layout_continues_the_run(tmp_path, reference):
    """Saved after step 3 at tp 1 x dp 2 and at tp 1 x pp 2 x dp 2, resumed at tp 2 x pp 1 x
    dp 1 (the distributed optimizer throughout): its state and the weights reshard, the data
    ranks' positions merge into one, and steps 4-6 are the uninterrupted one-process run's."""
    for name, before, nproc in (
        ("dp2", [], 2),
        ("pp2_dp2", ["parallel.pp=2"], 4),
    ):
        out = tmp_path / name
        run_train(out, "train.max_steps=3", *before, nproc=nproc)
        run_train(out, *REFERENCE, "parallel.tp=2", nproc=2)
        meta = json.loads((out / "checkpoints/step_0000006/longvila.json").read_text())
        assert (meta["tp"], meta["pp"], meta["dp"]) == (2, 1, 1)
        same_steps(out, reference, range(1, 7), 1e-5)


# --- starting from a converted checkpoint -----------------------------------------------------


def hf_loss(reference, batches) -> float:
    """Mean cross-entropy over every target of `batches`, each packed sample run on its own
    through the HF-assembled model."""
    total, targets = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            bounds = batch.cu_seqlens.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                embeds = reference.embeddings(
                    batch.input_ids[start:end], batch.media_index[start:end], batch.frames
                )
                logits = reference.llm(inputs_embeds=embeds).logits[0]
                labels = batch.labels[start:end]
                total += torch.nn.functional.cross_entropy(
                    logits, labels, ignore_index=-100, reduction="sum"
                ).item()
                targets += int((labels != -100).sum())
    return total / targets


@pytest.mark.slow
def test_legacy_order_survives_conversion_training_and_export(tmp_path, transformers4):
    """hf-to-mcore --token-order legacy, then training from it with no flag: the first loss is
    the HF assembly's in the legacy order (not the raster one), so the run used the order the
    checkpoint records; the trained checkpoint records it, and so does its mcore-to-hf export,
    which loads unedited in transformers 4.46 and 5 (its tokenizer saved by transformers 5)."""
    from longvila_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from longvila_mcore.checkpoint.hf import read_config_and_tokenizer
    from longvila_mcore.config import DataConfig
    from longvila_mcore.data.pipeline import build_pipeline
    from longvila_mcore.data.synthetic import synthetic_paths
    from tests.hf_reference import (
        HFLongVILA,
        make_vila_checkpoint,
        tiny_llm_config,
        tiny_vision_config,
    )
    from tests.transformers4 import assert_export_loads_in_4_and_5

    hf_dir = make_vila_checkpoint(
        tmp_path / "hf",
        synthetic_paths().tokenizer_dir,
        tiny_llm_config(vocab_size=512),
        tiny_vision_config(),
        qk_scale=10.0,  # attention sharp enough for the token order to show in the loss
    )
    mcore = hf_to_mcore(hf_dir, tmp_path / "mcore", tp=2, token_order="legacy")
    out = tmp_path / "run"
    run_train(out, "+stage=3_sft", "train.max_steps=1", f"checkpoint.load={mcore}")

    cfg, tokenizer, _ = read_config_and_tokenizer(hf_dir, "legacy")
    pipeline = build_pipeline(
        DataConfig(),
        "conversation",
        tokenizer,
        cfg,
        num_frames=8,
        fps=None,
        max_length=4096,
        global_batch_size=8,
        micro_batch_size=4,
        pad_multiple=2,
        dp_rank=0,
        dp_size=1,
        seed=1234,
    )
    batches = next(pipeline)
    pipeline.close()
    expected = {
        order: hf_loss(HFLongVILA(hf_dir, order), batches) for order in ("legacy", "raster")
    }
    # the orders' losses differ by ~5e-5 (relative); ours matches the legacy one within 1e-5
    assert abs(expected["legacy"] - expected["raster"]) > 2e-5 * expected["legacy"]
    assert abs(losses(out)[1] - expected["legacy"]) <= 1e-5 * expected["legacy"]

    trained = out / "checkpoints" / "step_0000001"
    assert json.loads((trained / "longvila.json").read_text())["model"]["token_order"] == "legacy"
    export = mcore_to_hf(trained, tmp_path / "export")
    assert read_config_and_tokenizer(export)[0].token_order == "legacy"  # what hf-to-mcore reads
    assert_export_loads_in_4_and_5(transformers4, export, tmp_path / "export_4.46")


def test_an_explicit_token_order_wins_over_the_checkpoint(tmp_path):
    from longvila_mcore.train import _explicit_token_order, _starting_point

    config = Config()
    assert _explicit_token_order(config, ["+stage=3_sft", "train.max_steps=1"]) is None
    config.model.token_order = "legacy"
    assert _explicit_token_order(config, ["+stage=3_sft", "model.token_order=legacy"]) == "legacy"
    assert _explicit_token_order(config, ["++model.token_order=legacy"]) == "legacy"

    from longvila_mcore.data.synthetic import synthetic_paths
    from tests.hf_reference import make_vila_checkpoint, tiny_llm_config, tiny_vision_config

    hf_dir = make_vila_checkpoint(
        tmp_path / "hf",
        synthetic_paths().tokenizer_dir,
        tiny_llm_config(vocab_size=512),
        tiny_vision_config(),
    )
    config = Config()
    assert _starting_point(config, hf_dir)[0].token_order == "raster"  # the releases' order
    assert _starting_point(config, hf_dir, "legacy")[0].token_order == "legacy"


def test_metrics_lines_and_tensorboard(tmp_path):
    from longvila_mcore.training.metrics import MetricsWriter

    record = {
        "step": 1,
        "loss": 2.5,
        "lr": 1e-4,
        "grad_norm": 0.5,
        "tokens": 10,
        "step_time_s": 0.1,
        "data_wait_s": 0.02,
        "tokens_per_s": 83.3,
        "samples_per_s": 66.7,
        "mfu": 0.001,
        "peak_memory_gib": 1.5,
        "peak_memory_gib_per_rank": [1.5],
        "skipped_samples": 0,
        "skipped_steps": 0,
    }
    for _ in range(2):  # a resumed run appends to the same file
        writer = MetricsWriter(tmp_path, 0, 1, 1, tensorboard=True, enabled=True)
        writer.write(record)
        writer.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        record
    ] * 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# --- non-finite steps -------------------------------------------------------------------------


def _config(*overrides: str) -> Config:
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=[STAGE, *BASE, *overrides]))


@pytest.mark.slow
def test_non_finite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, single_rank):
    """From step 2 on every loss is NaN (injected): steps 2 and 3 are skipped and counted, and
    with train.max_consecutive_skipped_steps=2 the run stops after step 3 with one message."""
    from longvila_mcore.errors import NonFiniteError
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.train import train

    config = _config(
        f"run.output_dir={tmp_path}", "train.max_steps=5", "train.max_consecutive_skipped_steps=2"
    )
    loss, calls = LongVILAModel.loss, []

    def poisoned(self, batch):  # 2 micro-batches a step: the third call is step 2's
        calls.append(1)
        loss_sum, targets = loss(self, batch)
        return (loss_sum * float("nan") if len(calls) > 2 else loss_sum), targets

    LongVILAModel.loss = poisoned
    try:
        with pytest.raises(NonFiniteError, match=r"^step 3: 2 steps in a row .*non-finite"):
            train(config)
    finally:
        LongVILAModel.loss = loss
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2]
    assert torch.isfinite(torch.tensor(records[0]["grad_norm"]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_throughput_metrics_and_their_plot(tmp_path, reference):
    """A tiny run's metrics.jsonl holds throughput, MFU, memory and data wait per step, and
    tools/plot_metrics.py draws it into RUN_DIR/metrics.png."""
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        wall = r["step_time_s"] + r["data_wait_s"]
        assert r["data_wait_s"] >= 0 and r["step_time_s"] > 0
        assert abs(r["tokens_per_s"] - r["tokens"] / wall) <= 1e-6 * r["tokens_per_s"]
        assert abs(r["samples_per_s"] - 8 / wall) <= 1e-6 * r["samples_per_s"]
        assert 0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0.1
        assert r["peak_memory_gib_per_rank"] == [r["peak_memory_gib"]]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text())
    done = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(run), "--smooth", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """Config, data, checkpoint and divergence errors: exit status 2 and one line; a signalled
    stop: 75, also in $LONGVILA_EXIT_STATUS_FILE; any other error (a plain ValueError included)
    propagates with its traceback."""
    from longvila_mcore.checkpoint.tensors import CheckpointError
    from longvila_mcore.errors import ConfigError, DataError, NonFiniteError
    from longvila_mcore.train import PREEMPTED, Preempted, exit_status

    def raising(error):
        def run():
            raise error

        return run

    for error in (ConfigError("c"), DataError("d"), CheckpointError("k"), NonFiniteError("n")):
        assert exit_status(raising(error)) == 2
        assert capsys.readouterr().err == f"error (rank 0): {error}\n"
    status_file = tmp_path / "status"
    monkeypatch.setenv("LONGVILA_EXIT_STATUS_FILE", str(status_file))
    assert exit_status(raising(Preempted("step 3: stopped by SIGTERM, saved"))) == PREEMPTED == 75
    assert status_file.read_text() == "75\n"
    for bug in (ValueError("internal"), RuntimeError("internal")):
        with pytest.raises(type(bug), match="internal"):
            exit_status(raising(bug))
    assert exit_status(lambda: None) == 0


def test_a_data_error_is_one_line(tmp_path):
    """Shards that do not exist: one line naming the pattern, exit status 2, no traceback."""
    done = subprocess.run(
        train_command(tmp_path, "data=webdataset", f"data.conversation={tmp_path}/missing-*.tar"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "matches no file" in done.stderr and "Traceback" not in done.stderr
