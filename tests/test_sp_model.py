"""The whole LongVILA model under MM-SP: loss and every parameter's gradient equal one process.

4 gloo ranks run the single-process model first (every rank alone, Megatron groups of one),
then the same weights and batch under Ulysses 2 x ring 2 and under TP 2 x Ulysses 2. The video
has 5 frames, which 4 sequence-parallel ranks do not divide; the tower's gradients are included.
"""

import pytest
import torch

from tests.multiproc import run_ranks

TOLERANCE = 1e-5
LAYOUTS = {"u2_r2": dict(ulysses=2, ring=2), "tp2_u2": dict(tp=2, ulysses=2)}


def model_config():
    from longvila_mcore.config import ModelConfig
    from tests.hf_reference import tiny_llm_config, tiny_vision_config

    return ModelConfig(llm=tiny_llm_config(), vision=tiny_vision_config())


def packed_batch(tokens_per_frame: int, frame_counts: tuple[int, int] = (3, 2)):
    """Two samples of 40 and 56 tokens (multiples of 2 x 4): `frame_counts` frames in each
    (default 3 and 2), each frame followed by a newline token; targets on the text after the
    frames."""
    from longvila_mcore.data.batch import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(3)
    ids, media, labels, positions = [], [], [], []
    frame = 0
    for length, frames in zip((40, 56), frame_counts, strict=True):
        sample_media = [-1] * 2
        for _ in range(frames):
            sample_media += [frame * tokens_per_frame + t for t in range(tokens_per_frame)] + [-1]
            frame += 1
        sample_media += [-1] * (length - len(sample_media))
        sample_ids = torch.randint(0, 90, (length,), generator=g)
        sample_ids[torch.tensor(sample_media) >= 0] = 95
        text_start = 2 + frames * (tokens_per_frame + 1)
        sample_labels = torch.full((length,), IGNORE_INDEX)
        sample_labels[text_start:-1] = sample_ids[text_start + 1 :]
        ids.append(sample_ids)
        media += sample_media
        labels.append(sample_labels)
        positions.append(torch.arange(length))
    return Batch(
        input_ids=torch.cat(ids),
        media_index=torch.tensor(media),
        labels=torch.cat(labels),
        position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor([0, 40, 96]),
        frames=torch.randn(frame, 3, 16, 16, generator=g),
    )


def loss_and_grads(parallel, frame_counts=(3, 2), own_frames=False):
    """(mean loss over all targets, {name: gradient} summed over the sequence-parallel ranks);
    with `own_frames` each rank's batch holds only the frames it encodes (Batch contract)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel

    init_model_parallel(parallel)
    cfg = model_config()
    torch.manual_seed(0)
    model = LongVILAModel(cfg, parallel, torch.device("cpu"))
    batch = packed_batch(cfg.tokens_per_frame, frame_counts)
    if own_frames:
        batch = batch.frames_of(model.sp.rank, model.sp.size)
        assert len(batch.frames) <= -(-batch.num_frames // model.sp.size)
    loss_sum, _ = model.loss(batch)
    (loss_sum / batch.num_targets).backward()
    cp = parallel_state.get_context_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_group()
    dist.all_reduce(loss_sum, group=cp)
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=cp)
            if getattr(p, "sequence_parallel", False):  # a norm that saw 1/tp of the tokens
                dist.all_reduce(grad, group=tp)
            grads[name] = (grad, p)
    return (loss_sum / batch.num_targets).item(), grads


def _compare_layouts(frame_counts=(3, 2), own_frames=False):
    from megatron.core import parallel_state

    from longvila_mcore.checkpoint.mapping import tensor_parallel_slice
    from longvila_mcore.config import ParallelConfig

    ref_loss, ref_grads = loss_and_grads(ParallelConfig(), frame_counts)  # dp 4: each alone
    errors = {}
    for name, layout in LAYOUTS.items():
        parallel = ParallelConfig(**layout)
        loss, grads = loss_and_grads(parallel, frame_counts, own_frames)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        worst, worst_param = 0.0, None
        for pname, (grad, param) in grads.items():
            ref = tensor_parallel_slice(ref_grads[pname][0], param, tp_rank, parallel.tp)
            err = ((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            if err > worst:
                worst, worst_param = err, pname
        assert any(n.startswith("vision_tower.encoder") for n in grads)
        errors[name] = {
            "loss": abs(loss - ref_loss) / abs(ref_loss),
            "grad": worst,
            "param": worst_param,
        }
    return errors


@pytest.mark.slow
def test_model_loss_and_gradients_match_one_process():
    errors = run_ranks(4, _compare_layouts)
    for layout, e in errors.items():
        assert e["loss"] <= TOLERANCE and e["grad"] <= TOLERANCE, (layout, e)


def _compare_own_frames():
    """F = 2 (< N at u2_r2, = N at tp2_u2), 4 (= N at u2_r2), 5 (N does not divide it)."""
    return {
        counts: _compare_layouts(counts, own_frames=True) for counts in ((1, 1), (2, 2), (3, 2))
    }


@pytest.mark.slow
def test_each_rank_holding_only_its_frames_gives_the_one_process_loss_and_gradients():
    for counts, errors in run_ranks(4, _compare_own_frames).items():
        for layout, e in errors.items():
            assert e["loss"] <= TOLERANCE and e["grad"] <= TOLERANCE, (counts, layout, e)
