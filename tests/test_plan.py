"""The parallelism planner: its layouts, its memory model against real CPU runs, its CLI.

Memory is checked three ways: parameter counts against the built model, the activation terms
against the tensors autograd saves (exact), and the whole prediction against the peak resident
memory of real training steps on gloo ranks (tests/plan_probe.py; within 15%).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvila_mcore.config import LLMConfig, ModelConfig, ParallelConfig, VisionConfig, model_preset
from longvila_mcore.parallel import plan as planner
from longvila_mcore.parallel.plan import CPU_FP32, GPUS, USABLE, Layout, Workload
from tests.multiproc import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15

# Calibration models: big enough that activations, weights and optimizer state are each tens of
# MiB (far above the process's own noise), small enough for two CPU cores.
MODEL_A = ModelConfig(
    llm=LLMConfig(
        vocab_size=8192,
        hidden_size=256,
        num_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        ffn_hidden_size=768,
    ),
    vision=VisionConfig(
        image_size=112,
        patch_size=14,
        hidden_size=128,
        num_layers=4,
        num_attention_heads=4,
        ffn_hidden_size=512,
    ),
)
MODEL_B = ModelConfig(
    llm=LLMConfig(
        vocab_size=16384,
        hidden_size=384,
        num_layers=2,
        num_attention_heads=12,
        num_key_value_heads=4,
        ffn_hidden_size=1024,
        tie_word_embeddings=False,
    ),
    vision=VisionConfig(
        image_size=84,
        patch_size=14,
        hidden_size=192,
        num_layers=3,
        num_attention_heads=6,
        ffn_hidden_size=768,
    ),
)


def _cli_module():
    spec = importlib.util.spec_from_file_location(
        "plan_parallelism", ROOT / "tools" / "plan_parallelism.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan_parallelism.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


# --- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, nodes, gpus",
    [
        ("longvila_7b", 4, 8),
        ("longvila_1.5b", 2, 8),
        ("longvila_1.5b", 4, 2),
        ("longvila_tiny", 1, 4),
    ],
)
def test_layouts_are_exactly_those_check_model_accepts(name, nodes, gpus):
    model = model_preset(name)
    world = nodes * gpus
    found = planner.layouts(model, world, gpus)
    assert len(set(found)) == len(found)
    expected = set()
    for tp in range(1, world + 1):
        for pp in range(1, world + 1):
            for u in range(1, world + 1):
                for r in range(1, world + 1):
                    parallel = ParallelConfig(tp=tp, pp=pp, ulysses=u, ring=r)
                    if world % (tp * pp * u * r) or gpus % (tp * u):
                        continue
                    try:
                        parallel.check_model(model)
                    except ValueError:
                        continue
                    expected.add((tp, pp, u, r, world // (tp * pp * u * r)))
    assert {(x.tp, x.pp, x.ulysses, x.ring, x.dp) for x in found} == expected
    for layout in found:
        layout.parallel().check_model(model)  # raises if not accepted
        assert layout.parallel().data_parallel_size(world) == layout.dp
    assert {(x.recompute, x.distributed_optimizer) for x in found} == {
        (r, d) for r in planner.RECOMPUTE for d in (False, True)
    }


def test_optimizer_state_is_sharded_over_dp_and_sp_only_with_the_distributed_optimizer():
    model = model_preset("longvila_1.5b")
    work = Workload.video(model, 64)
    off = planner.memory(model, Layout(ulysses=2, ring=2, dp=2), work)
    on = planner.memory(model, Layout(ulysses=2, ring=2, dp=2, distributed_optimizer=True), work)
    trainable = planner.stage_params(model, Layout(), work, True, True).trainable
    assert off.optimizer == trainable * (4 + 8)  # fp32 master + two Adam moments
    assert on.optimizer == off.optimizer / 8
    assert (on.weights, on.grads, on.decoder) == (off.weights, off.grads, off.decoder)


def test_recompute_terms_order_and_full_keeps_layer_inputs():
    model = model_preset("longvila_7b")
    work = Workload.video(model, 256)
    mem = {
        r: planner.memory(model, Layout(ulysses=4, ring=2, recompute=r), work)
        for r in planner.RECOMPUTE
    }
    assert mem["full"].decoder < mem["selective"].decoder < mem["none"].decoder
    local = work.padded_tokens(Layout(ulysses=4, ring=2)) // 8
    layer = planner.decoder_layer_saved(model, Layout(ulysses=4, ring=2))
    h = model.llm.hidden_size
    working = 3 * model.llm.ffn_hidden_size  # MLP gradients of the layer in its backward
    assert mem["full"].decoder == (28 * h + layer + working + 2 * h) * local * 2


# --- the memory model against the code -----------------------------------------------------------


def _saved_bytes(params: set[int], module, **kwargs) -> int:
    """Bytes of the tensors autograd saves while `module(**kwargs)` runs, parameters excepted."""
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(**kwargs)
    # Tensors a Function holds on its ctx instead of saving them (the 2D attention under
    # Ulysses, which frees them early in its backward) are kept for the backward all the same.
    nodes, seen_nodes = [o.grad_fn for o in _tensors(out) if o.grad_fn is not None], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for t in getattr(node, "held", None) or []:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        nodes += [next_node for next_node, _ in node.next_functions]
    return sum(seen.values())


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _tensors(item)] if isinstance(out, tuple | list) else []


def _model_checks(cases):
    """On this rank: (held, trainable) parameter counts and the bytes autograd saves per decoder
    and tower layer, for each (model, parallel, frames, tokens)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.parallel.core_attention import PackedSamples
    from longvila_mcore.runtime import destroy_model_parallel, init_model_parallel
    from tests.plan_probe import video_batch

    results = []
    for cfg, parallel, frames, tokens in cases:
        init_model_parallel(parallel)
        torch.manual_seed(0)
        model = LongVILAModel(cfg, parallel, torch.device("cpu"))
        model.set_trainable(True, True, True)
        held = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        batch = video_batch(tokens, frames, 16, cfg.tokens_per_frame, cfg.vision.image_size)

        frames_in = -(-frames // parallel.sp)
        patches = cfg.vision.num_patches_per_side**2
        hidden = torch.randn(patches, frames_in, cfg.vision.hidden_size, requires_grad=True)
        tower = _saved_bytes(
            params, model.vision_tower.encoder.layers[0], hidden_states=hidden, attention_mask=None
        )
        positions = model.sp.shard(batch.position_ids, cu_seqlens=batch.cu_seqlens)[None]
        embedded = model.embed(batch).detach()
        if parallel.tp_sequence_parallel:  # a layer takes this rank's 1/tp of the tokens
            embedded = embedded.chunk(parallel.tp)[parallel_state.get_tensor_model_parallel_rank()]
            embedded = embedded.clone()  # its own storage, as the scatter gives
        decoder = _saved_bytes(
            params,
            model.llm.decoder.layers[0],
            hidden_states=embedded.requires_grad_(),
            attention_mask=None,
            rotary_pos_emb=model.llm.rotary_freqs(positions),
            packed_seq_params=PackedSamples(boundaries=(0, tokens)),
        )
        results.append((held, trainable, decoder, tower))
        del model
        destroy_model_parallel()
    dist.barrier()
    return results


@pytest.mark.slow
def test_parameter_counts_and_saved_activations_match_the_model():
    """Exact: parameters per rank (held and trainable) and the bytes each decoder and tower layer
    saves for its backward, for one rank, Ulysses 2, ring 2 and tp 2."""
    cases = [
        (MODEL_A, ParallelConfig(), 8, 1024),
        (MODEL_A, ParallelConfig(ulysses=2), 8, 1024),
        (MODEL_A, ParallelConfig(ring=2), 8, 1024),
        (MODEL_B, ParallelConfig(tp=2), 6, 512),
    ]
    results = run_ranks(2, _model_checks, cases)
    for (cfg, parallel, frames, tokens), (held, trainable, decoder, tower) in zip(cases, results):
        dp = 2 // (parallel.tp * parallel.sp)
        layout = Layout(parallel.tp, 1, parallel.ulysses, parallel.ring, dp)
        work = Workload(frames, tokens, 16)
        params = planner.stage_params(cfg, layout, work, True, True)
        assert (held, trainable) == (params.held, params.trainable), parallel
        local = tokens // parallel.sp
        assert decoder == planner.decoder_layer_saved(cfg, layout) * local * 4, parallel
        patches = cfg.vision.num_patches_per_side**2
        per_token = planner.tower_layer_saved(cfg, parallel.tp)
        assert tower == per_token * patches * -(-frames // parallel.sp) * 4, parallel


CALIBRATION = {
    # name: (model, layout, frames, tokens, targets, trainable)
    "A one rank 4k": (MODEL_A, Layout(), 16, 4096, 256, None),
    "A text 2k, every token a target": (MODEL_A, Layout(), 0, 2048, 2047, ("llm",)),
    "A ulysses 2, 4k": (MODEL_A, Layout(ulysses=2), 32, 4096, 256, None),
    "A ring 2, 4k": (MODEL_A, Layout(ring=2), 32, 4096, 256, None),
    "A dp 2, 2k": (MODEL_A, Layout(dp=2), 16, 2048, 256, None),
    "B tp 2, 2k": (MODEL_B, Layout(tp=2), 24, 2048, 512, None),
    "B ulysses 2 x ring 2, 4k": (MODEL_B, Layout(ulysses=2, ring=2), 48, 4096, 256, None),
    "B one rank 512, weights and Adam dominate": (MODEL_B, Layout(), 4, 512, 64, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CALIBRATION))
def test_memory_model_against_measured_peak(name):
    """Predicted peak (CPU, fp32) within 15% of the measured peak of two real training steps."""
    from tests.plan_probe import measure_peak

    cfg, layout, frames, tokens, targets, trainable = CALIBRATION[name]
    work = Workload(frames, tokens, targets, trainable or Workload.trainable)
    predicted = planner.peak_memory(cfg, layout, work, CPU_FP32).total
    # A resident-size peak can carry transient noise (the tp 2 case measured 279 MiB in every
    # run here but 307 once, in a CI run on a busy machine): a second measurement decides, and
    # the smaller one counts.
    measured = [run_ranks(layout.world, measure_peak, cfg, layout.parallel(), work)]
    if abs(predicted - measured[0]) > TOLERANCE * measured[0]:
        measured.append(run_ranks(layout.world, measure_peak, cfg, layout.parallel(), work))
    assert abs(predicted - min(measured)) <= TOLERANCE * min(measured), (
        f"{name}: predicted {predicted / 2**20:.1f} MiB, measured "
        + ", ".join(f"{m / 2**20:.1f}" for m in measured)
        + " MiB"
    )


# --- the command line ----------------------------------------------------------------------------


def test_cli_json_and_the_7b_recipe():
    """The README's command: the last line is the ranked list; the top layout passes check_model
    and fits an 80 GB H100."""
    run = _cli(
        "--model",
        "longvila_7b",
        "--frames",
        "1024",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--gpu",
        "h100-80gb",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    keys = {
        "tp",
        "pp",
        "ulysses",
        "ring",
        "dp",
        "recompute",
        "distributed_optimizer",
        "memory_gib",
        "step_time_s",
    }
    assert rows and all(set(r) == keys for r in rows)
    assert [r["step_time_s"] for r in rows] == sorted(r["step_time_s"] for r in rows)
    model = model_preset("longvila_7b")
    for r in rows:
        ParallelConfig(tp=r["tp"], pp=r["pp"], ulysses=r["ulysses"], ring=r["ring"]).check_model(
            model
        )
        assert r["tp"] * r["pp"] * r["ulysses"] * r["ring"] * r["dp"] == 32
        assert r["memory_gib"] <= USABLE * GPUS["h100-80gb"].memory_gib
    top = rows[0]
    assert top["memory_gib"] < 80
    # The README and launch/slurm.sbatch recipes are this layout.
    overrides = [f"parallel.{k}={top[k]}" for k in ("tp", "pp", "ulysses", "ring") if top[k] > 1]
    overrides += [
        f"train.recompute={top['recompute']}",
        f"train.distributed_optimizer={str(top['distributed_optimizer']).lower()}",
    ]
    for path in ("README.md", "launch/slurm.sbatch"):
        recipe = (ROOT / path).read_text().split("+stage=5_sft_1024f model=longvila_7b", 1)[1]
        recipe = recipe.split("run.output_dir", 1)[0]
        assert sorted(w for w in recipe.split() if w.startswith(("parallel.", "train."))) == sorted(
            overrides
        ), path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "longvila_9b", "--frames", "8"], "no model preset 'longvila_9b'"),
        (["--model", "missing.yaml", "--frames", "8"], "--model missing.yaml: no such file"),
        (["--model", "longvila_7b", "--frames", "0"], "--frames 0"),
        (["--model", "longvila_7b", "--tokens", "1"], "--tokens 1"),
        (["--model", "longvila_7b", "--frames", "8", "--nodes", "0"], "--nodes 0"),
        (["--model", "longvila_7b", "--frames", "8", "--gpu", "v100"], "--gpu v100: unknown GPU"),
        (["--model", "longvila_7b", "--frames", "8", "--mfu", "1.5"], "--mfu 1.5"),
        (
            ["--model", "longvila_7b", "--frames", "8", "--global-batch-size", "0"],
            "--global-batch-size 0",
        ),
        (
            ["--model", "longvila_7b", "--frames", "4096", "--nodes", "1", "--gpus-per-node", "1"],
            "no layout fits 79.6 GiB",
        ),
    ],
)
def test_cli_bad_input_is_one_line(args, message, capsys):
    """In-process (the entry point's `main`): one `error:` line naming the value, exit code 2."""
    defaults = {"--nodes": "1", "--gpus-per-node": "8", "--gpu": "h100-80gb"}
    for key, value in defaults.items():
        if key not in args:
            args = [*args, key, value]
    assert _cli_module().main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured
    assert captured.out == ""
