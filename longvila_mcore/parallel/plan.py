"""Parallel layouts of a LongVILA run: enumerate them, predict per-rank memory and step time, rank.

`tools/plan_parallelism.py` is the command line; everything it prints comes from `plan()`.

A layout is (tp, pp, ulysses, ring, dp, recompute, distributed optimizer). Only layouts that
`ParallelConfig.check_model` accepts are listed, with tp x ulysses dividing a node (the
all-to-all stays on NVLink, README "Parallelism").

Memory (bytes per rank, the largest pipeline stage) is a sum of separate terms (`Memory`):
- weights: every parameter the rank holds (frozen ones too) at `Precision.weight` bytes;
- grads: the trainable ones in DDP's gradient buffer (fp32, `grad_reduce_in_fp32`), never
  sharded: Megatron's distributed optimizer reduce-scatters into the full buffer;
- optimizer: fp32 master weights (when the weights are not fp32 already) and Adam's two moments,
  divided by dp x sp with the distributed optimizer (Megatron shards over dp with context
  parallel), whole without it;
- decoder and tower: the tensors autograd saves for the backward (`decoder_layer_saved`,
  `tower_layer_saved`), counted tensor by tensor from what the local-spec layers save on CPU
  (listed per term below), times the layers of the stage and the micro-batches in flight (1F1B:
  pp on the first stage), plus the MLP gradients of the layer whose backward runs; with
  recomputation only what the recomputed layers keep;
- sharder: the projector's features of this rank's frames and the embedded token shard;
- logits: the vocabulary-parallel cross entropy at target positions (the fp32 softmax it keeps,
  which becomes the gradient in place) and the transient gradient of the output / embedding
  table.
`calibration` tests these against the peak resident memory of real CPU training steps.

Step time (seconds per optimizer step of `global_batch_size` samples, one sample a micro-batch):
compute = model FLOPs / (tp x sp) at `mfu` of the GPU's dense bf16 peak (recomputation adds its
forward again), plus the pipeline bubble, plus exposed communication at the stated bandwidths:
Ulysses all-to-all and tensor-parallel all-reduces in full, the ring's point-to-point traffic
(REFERENCE 4 volumes) beyond the attention it overlaps, the gradient reduction over dp x sp beyond
one micro-batch's backward it overlaps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from longvila_mcore.config import ModelConfig, ParallelConfig, model_preset
from longvila_mcore.errors import ConfigError

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")
TEXT_TOKENS = 512
"""Text tokens of a video sample besides its frames (system prompt, question, answer)."""
TARGET_TOKENS = 256
"""Of which targets (the answer): logits are computed at target positions only."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    """What the device reports (nvidia-smi)."""
    tflops: float
    """Dense bf16 peak."""
    intra_gbps: float
    """NVLink, GB/s per GPU per direction."""
    inter_gbps: float
    """InfiniBand, GB/s per GPU per direction (one NIC a GPU)."""


GPUS = {
    "h100-80gb": Gpu("h100-80gb", 79.6, 989.0, 450.0, 50.0),  # NVLink 4, NDR 400 Gb/s
    "h200": Gpu("h200", 139.8, 989.0, 450.0, 50.0),
    "a100-80gb": Gpu("a100-80gb", 79.2, 312.0, 300.0, 25.0),  # NVLink 3, HDR 200 Gb/s
}
USABLE = 0.9
"""Share of a GPU's memory the prediction may fill: the rest is the CUDA context, NCCL buffers
and the caching allocator's fragmentation."""
MFU = 0.4
"""Model FLOPs utilisation assumed for compute (of the dense bf16 peak)."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor."""

    weight: int
    grad: int
    master: int
    """fp32 master copy kept by the optimizer (0 when the weights are fp32 themselves)."""
    activation: int
    adam: int = 8
    """exp_avg and exp_avg_sq, fp32."""


GPU_BF16 = Precision(weight=2, grad=4, master=4, activation=2)
CPU_FP32 = Precision(weight=4, grad=4, master=0, activation=4)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1
    recompute: str = "none"
    distributed_optimizer: bool = False

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.sp * self.dp

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, ulysses=self.ulysses, ring=self.ring)


@dataclass(frozen=True)
class Workload:
    """One micro-batch is one sample of `tokens` (padded) with `frames` frames."""

    frames: int
    tokens: int
    targets: int
    trainable: tuple[str, ...] = ("vision_tower", "mm_projector", "llm")
    global_batch_size: int = 32

    @classmethod
    def video(cls, model: ModelConfig, frames: int, global_batch_size: int = 32) -> Workload:
        """Stage 5: each frame is its projector tokens plus a newline token (REFERENCE 1)."""
        if frames < 1:
            raise ConfigError(f"--frames {frames}: give at least one frame")
        tokens = frames * (model.tokens_per_frame + 1) + TEXT_TOKENS
        return cls(frames, tokens, TARGET_TOKENS, global_batch_size=global_batch_size)

    @classmethod
    def text(cls, tokens: int, global_batch_size: int = 32) -> Workload:
        """Stage 4: text only, every token a target, only the LLM learns."""
        if tokens < 2:
            raise ConfigError(f"--tokens {tokens}: give a sequence of at least 2 tokens")
        return cls(0, tokens, tokens, ("llm",), global_batch_size)

    def padded_tokens(self, layout: Layout) -> int:
        """A sample is padded to a multiple of 2 x ring (zigzag chunks), the pack to a multiple
        of ulysses x ring (equal shards; parallel/attention_2d.py)."""
        sample = 2 * layout.ring if layout.ring > 1 else 1
        tokens = -(-self.tokens // sample) * sample
        return -(-tokens // layout.sp) * layout.sp


# --- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """Parameter elements one rank holds: (all, trainable)."""

    held: int
    trainable: int

    def __add__(self, other: Params) -> Params:
        return Params(self.held + other.held, self.trainable + other.trainable)


def _padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def decoder_layer_params(model: ModelConfig, tp: int) -> int:
    """One Qwen2 layer's elements on a tensor-parallel rank: q/k/v (with bias), o, fc1 (gate and
    up), fc2 split over tp; the two RMSNorm weights replicated."""
    llm = model.llm
    d = llm.hidden_size // llm.num_attention_heads
    qkv = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * d
    h, f = llm.hidden_size, llm.ffn_hidden_size
    return (h * qkv + qkv + h * h + 3 * h * f) // tp + 2 * h


def tower_layer_params(model: ModelConfig, tp: int) -> int:
    """One SigLIP layer: q/k/v, o, fc1, fc2 weights and column biases over tp; the row-parallel
    biases (o, fc2) and the two LayerNorms replicated."""
    c, f = model.vision.hidden_size, model.vision.ffn_hidden_size
    split = 3 * c * c + 3 * c + c * c + c * f + f + f * c
    return split // tp + 2 * c + 4 * c


def llm_params(model: ModelConfig, layout: Layout, first: bool, last: bool) -> int:
    llm = model.llm
    vocab = _padded_vocab(llm.vocab_size, layout.tp) * llm.hidden_size // layout.tp
    n = llm.num_layers // layout.pp * decoder_layer_params(model, layout.tp)
    if first:
        n += vocab
    if last:
        n += llm.hidden_size  # final norm
        # The output layer; with tied embeddings a later stage holds a copy of the table.
        if not llm.tie_word_embeddings or not first:
            n += vocab
    return n


def tower_params(model: ModelConfig, tp: int) -> Params:
    """All SigLIP layers are held (for the checkpoint round trip); only the used ones learn."""
    v = model.vision
    c, f, p = v.hidden_size, v.ffn_hidden_size, v.num_patches_per_side**2
    embed = 3 * v.patch_size**2 * c + c + p * c
    layer = tower_layer_params(model, tp)
    frozen = (v.num_layers - v.num_used_layers) * layer + 2 * c  # unused layers, post-LayerNorm
    if v.use_head:  # HF's pooling head: probe, attention, LayerNorm, MLP
        frozen += c + 3 * c * c + 3 * c + c * c + c + 2 * c + c * f + f + f * c + c
    used = embed + v.num_used_layers * layer
    return Params(used + frozen, used)


def projector_params(model: ModelConfig) -> int:
    """LayerNorm(4C) -> Linear(4C, H) -> Linear(H, H), replicated over tp."""
    c4, h = 4 * model.vision.hidden_size, model.llm.hidden_size
    return 2 * c4 + c4 * h + h + h * h + h


def stage_params(model: ModelConfig, layout: Layout, work: Workload, first: bool, last: bool):
    """Parameters of one pipeline stage (the tower and projector on the first)."""
    llm = llm_params(model, layout, first, last)
    held = Params(llm, llm if "llm" in work.trainable else 0)
    if first:
        tower = tower_params(model, layout.tp)
        held += Params(tower.held, tower.trainable if "vision_tower" in work.trainable else 0)
        proj = projector_params(model)
        held += Params(proj, proj if "mm_projector" in work.trainable else 0)
    return held


# --- activations -----------------------------------------------------------------------------


def _kv_heads_after_ulysses(model: ModelConfig, layout: Layout) -> int:
    """K/V heads a rank holds per query-head group after the all-to-all, x ulysses: K/V heads are
    replicated when ulysses does not divide the tensor-parallel rank's K/V heads."""
    kv = model.llm.num_key_value_heads // layout.tp
    return max(kv // layout.ulysses, 1) * layout.ulysses


def decoder_layer_saved(model: ModelConfig, layout: Layout) -> float:
    """Elements a decoder layer keeps for its backward per local token (no recomputation).

    Counted from what the local-spec layer saves (tests/test_plan.py checks the count against
    saved-tensor hooks): the RMSNorm's input and output and the q/k/v projection's input (3h), the
    same around the MLP norm and fc1's input (3h), RoPE's cos and sin for q and k (4d), q, k, v
    and the attention output and log-sum-exp, fc1's output (2f, kept by SwiGLU) and fc2's input
    (f). Without sequence parallelism v is a view of the fused q/k/v output, which stays alive
    whole, and o_proj's input is the attention output; with it, all-to-all outputs are separate
    tensors and o_proj's input (the all-to-all back) is one more. With tp > 1, Megatron's
    sequence parallelism (`parallel.sequence_parallel`, the default) holds the norms and the
    linear inputs they feed for 1/tp of the tokens (the linears gather them again in backward).
    """
    llm, t = model.llm, layout.tp
    d = llm.hidden_size // llm.num_attention_heads
    h, f = llm.hidden_size, llm.ffn_hidden_size
    hq = llm.num_attention_heads // t
    norms = (6 * h + 2) / t  # two norms: input, output, rstd; q/k/v and fc1 inputs
    mlp = 3 * f // t
    if layout.ulysses == 1:
        kv = llm.num_key_value_heads // t
        attention = hq * d + kv * d + (hq + 2 * kv) * d + hq * d + hq
    else:
        kv = _kv_heads_after_ulysses(model, layout)
        attention = hq * d + 2 * kv * d + hq * d + hq + hq * d
    return norms + 4 * d + attention + mlp


def tower_layer_saved(model: ModelConfig, tp: int) -> int:
    """Elements a SigLIP layer keeps per patch token: LayerNorm inputs and statistics, linear
    inputs (q/k/v, o, fc1, fc2), the folded q, k, v copies, the attention output and
    log-sum-exp, GELU's input (fc1's output)."""
    v = model.vision
    c, f, heads = v.hidden_size, v.ffn_hidden_size, v.num_attention_heads // tp
    return 4 * c + 2 * 2 + 4 * c // tp + heads + c // tp + 2 * f // tp


def projector_saved(model: ModelConfig) -> int:
    """Per projector token: LayerNorm(4C) input and output (the first Linear's input), GELU's
    input and the second Linear's input."""
    return 8 * model.vision.hidden_size + 2 + 2 * model.llm.hidden_size


@dataclass(frozen=True)
class Memory:
    """Predicted peak bytes of one rank, by term."""

    weights: float
    grads: float
    optimizer: float
    decoder: float
    tower: float
    sharder: float
    logits: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    @property
    def gib(self) -> float:
        return self.total / GIB


def _kept(saved: float, recomputed: int, layers: int, hidden: float, recompute: str) -> float:
    """Elements per token kept by `layers` layers that each save `saved`, of which selective
    recomputation drops `recomputed` (models/recompute.py).

    none: everything each layer saves. full (one layer a checkpoint, every layer): each layer's
    input, plus one layer's saved tensors while its backward recomputes it. selective: the
    recomputed modules keep only their inputs, which other tensors already count: the core
    attention's q, k, v stay, its output and log-sum-exp go; the decoder's MLP (fc1's input
    stays) drops fc1's output and fc2's input.
    """
    if recompute == "full":
        return layers * hidden + saved
    if recompute == "selective":  # ... which the layer whose backward runs holds again
        return layers * (saved - recomputed) + recomputed
    return layers * saved


def memory(
    model: ModelConfig,
    layout: Layout,
    work: Workload,
    precision: Precision = GPU_BF16,
    stage: str = "first",
) -> Memory:
    """Predicted peak of one rank of pipeline stage `stage` (`first` or `last`)."""
    first, last = stage == "first", stage == "last" or layout.pp == 1
    llm, a = model.llm, precision.activation
    params = stage_params(model, layout, work, first, last)
    shards = layout.dp * layout.sp if layout.distributed_optimizer else 1
    optimizer = params.trainable * (precision.master + precision.adam) / shards

    tokens = work.padded_tokens(layout)
    local = tokens // layout.sp
    # 1F1B keeps pp - stage micro-batches in flight: pp on the first stage, 1 on the last.
    in_flight = layout.pp if first else 1
    layers = llm.num_layers // layout.pp
    heads = llm.num_attention_heads // layout.tp
    attention = heads * (llm.hidden_size // llm.num_attention_heads + 1)
    mlp = 3 * llm.ffn_hidden_size // layout.tp
    saved = decoder_layer_saved(model, layout)
    # A layer's input (what full recomputation keeps) holds 1/tp of the tokens (see above).
    layer_input = llm.hidden_size / layout.tp
    kept = _kept(saved, attention + mlp, layers, layer_input, layout.recompute)
    # While a layer's backward runs: the gradients of its fc1 output and fc2 input.
    decoder = (in_flight * kept + mlp) * local * a
    if last:
        decoder += 2 * layer_input * local * a  # final norm: input and output

    tower = sharder = 0.0
    if first and work.frames:
        v = model.vision
        frames = -(-work.frames // layout.sp)
        patches = v.num_patches_per_side**2
        heads = v.num_attention_heads // layout.tp
        attention = heads * (v.hidden_size // v.num_attention_heads + 1)
        saved = tower_layer_saved(model, layout.tp)
        kept_tower = _kept(saved, attention, v.num_used_layers, v.hidden_size, layout.recompute)
        pixels = 3 * v.image_size**2
        per_frame = kept_tower * patches + model.tokens_per_frame * projector_saved(model)
        tower = in_flight * frames * (per_frame + pixels) * a
        # Projector output of this rank's frames, and the assembled shard being sent / received.
        sharder = (frames * model.tokens_per_frame + 2 * local) * llm.hidden_size * a

    logits = 0.0
    vocab = _padded_vocab(llm.vocab_size, layout.tp) // layout.tp
    if last:
        targets = -(-work.targets // layout.sp)
        # The fp32 softmax the cross entropy keeps and turns into the gradient in place (plus
        # the fp32 copy of low-precision logits), and the gradient of the output layer's weight
        # before it is added to the fp32 buffer.
        cast = a if a != 4 else 0
        logits = targets * vocab * (4 + cast) + vocab * llm.hidden_size * precision.weight
    elif first:
        logits = vocab * llm.hidden_size * precision.weight  # the embedding table's gradient
    return Memory(
        weights=params.held * precision.weight,
        grads=params.trainable * precision.grad,
        optimizer=optimizer,
        decoder=decoder,
        tower=tower,
        sharder=sharder,
        logits=logits,
    )


def peak_memory(
    model: ModelConfig, layout: Layout, work: Workload, precision: Precision = GPU_BF16
) -> Memory:
    """The larger of the first and the last pipeline stage (the only stage when pp = 1)."""
    stages = ("first", "last") if layout.pp > 1 else ("first",)
    return max((memory(model, layout, work, precision, s) for s in stages), key=lambda m: m.total)


# --- step time -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step, by part."""

    compute: float
    bubble: float
    ulysses: float
    ring: float
    tp: float
    pp: float
    grad_reduce: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


def _forward_flops(model: ModelConfig, work: Workload, tokens: int) -> tuple[float, float, float]:
    """(decoder, tower + projector, of which attention) FLOPs of one sample's forward pass."""
    llm, v = model.llm, model.vision
    h = llm.hidden_size
    layer = decoder_layer_params(model, 1) - 2 * h
    # Causal attention: QK^T and PV over half the square.
    attention = llm.num_layers * 2 * tokens * tokens * h
    decoder = 2 * llm.num_layers * layer * tokens + attention
    decoder += 2 * llm.vocab_size * h * work.targets  # output layer at target positions
    tower = 0.0
    if work.frames:
        patches = v.num_patches_per_side**2
        per_frame = v.num_used_layers * (
            2 * tower_layer_params(model, 1) * patches + 4 * patches * patches * v.hidden_size
        )
        tower_attention = work.frames * v.num_used_layers * 4 * patches * patches * v.hidden_size
        tower = work.frames * (per_frame + 2 * projector_params(model) * model.tokens_per_frame)
        attention += tower_attention
    return decoder, tower, attention


def _spans_nodes(stride: int, size: int, gpus_per_node: int) -> bool:
    """Whether a group of `size` ranks `stride` apart reaches beyond one node."""
    return size > 1 and stride * size > gpus_per_node


def step_time(
    model: ModelConfig,
    layout: Layout,
    work: Workload,
    gpu: Gpu,
    gpus_per_node: int,
    mfu: float = MFU,
) -> StepTime:
    """Predicted time of one optimizer step (see the module docstring for what overlaps).

    Megatron orders ranks tp, then context parallel (ulysses inside ring), then dp, then pp.
    """
    llm = model.llm
    tokens = work.padded_tokens(layout)
    local = tokens // layout.sp
    micro = -(-work.global_batch_size // layout.dp)
    flops_per_s = gpu.tflops * 1e12 * mfu
    decoder, tower, attention = _forward_flops(model, work, tokens)
    # Backward is twice the forward; recomputation runs (part of) the forward once more.
    mlp = 2 * llm.num_layers * 3 * llm.hidden_size * llm.ffn_hidden_size * tokens
    extra = {"none": 0.0, "selective": attention + mlp, "full": decoder + tower}[layout.recompute]
    shards = layout.tp * layout.sp
    total = (3 * (decoder + tower) + extra) / shards
    # The tower and projector sit on the first stage, so it is the slowest.
    stage = (3 * (decoder / layout.pp + tower) + extra / layout.pp) / shards / flops_per_s
    compute = micro * total / layout.pp / flops_per_s
    bubble = max(0.0, micro * stage + (layout.pp - 1) * stage - compute)
    a = 2  # bf16 activations on the wire
    # REFERENCE 4 gives forward volumes, the backward about twice; full recomputation repeats
    # the forward's.
    passes = 3 + (1 if layout.recompute == "full" else 0)
    d = llm.hidden_size // llm.num_attention_heads
    intra, inter = gpu.intra_gbps * 1e9, gpu.inter_gbps * 1e9
    layers = llm.num_layers // layout.pp

    ulysses = ring = tp = 0.0
    u, r = layout.ulysses, layout.ring
    if u > 1:  # REFERENCE 4: (2H + 2H_kv) S/N (U-1)/U per layer
        kv = _kv_heads_after_ulysses(model, layout) * d
        elements = (2 * llm.hidden_size // layout.tp + 2 * kv) * local * (u - 1) / u
        ulysses = micro * passes * layers * elements * a / intra
    if r > 1:  # REFERENCE 4: 2 S H_kv (R-1)/N per layer, overlapped with the ring's attention
        kv = _kv_heads_after_ulysses(model, layout) // u * d  # K/V width a rank holds
        elements = 2 * tokens * kv * (r - 1) / r
        bandwidth = inter if _spans_nodes(layout.tp * u, r, gpus_per_node) else intra
        traffic = passes * layers * elements * a / bandwidth
        overlapped = 3 * attention / layout.pp / shards / flops_per_s
        ring = micro * max(0.0, traffic - overlapped)
    if layout.tp > 1:  # two all-reduces of [s, h] per layer and pass
        t = layout.tp
        volume = 2 * local * llm.hidden_size * a * 2 * (t - 1) / t
        tp = micro * passes * layers * volume / intra
    pp = 0.0
    if layout.pp > 1:
        bandwidth = (
            inter if _spans_nodes(layout.world // layout.pp, layout.pp, gpus_per_node) else intra
        )
        pp = (micro + layout.pp - 1) * 2 * local * llm.hidden_size * a / bandwidth

    # Gradients over dp x sp (Megatron's data parallel group with context parallel), overlapped
    # with the backward of the last micro-batch.
    group = layout.dp * layout.sp
    grad_reduce = 0.0
    if group > 1:
        params = stage_params(model, layout, work, True, layout.pp == 1).trainable
        if layout.distributed_optimizer:  # reduce-scatter fp32 gradients, all-gather bf16 weights
            volume = params * (4 + 2) * (group - 1) / group
        else:
            volume = params * 4 * 2 * (group - 1) / group
        bandwidth = inter if _spans_nodes(layout.tp, group, gpus_per_node) else intra
        grad_reduce = max(0.0, volume / bandwidth - 2 / 3 * stage)
    return StepTime(compute, bubble, ulysses, ring, tp, pp, grad_reduce)


# --- enumeration and ranking -----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    time: StepTime

    def row(self) -> dict:
        """The `--json` record of this layout."""
        return {
            **dataclasses.asdict(self.layout),
            "memory_gib": round(self.memory.gib, 2),
            "step_time_s": round(self.time.total, 3),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: ModelConfig, world: int, gpus_per_node: int) -> list[Layout]:
    """Every layout `ParallelConfig.check_model` accepts, with tp x ulysses inside a node."""
    found = []
    for tp in _divisors(gpus_per_node):
        for ulysses in _divisors(gpus_per_node // tp):
            for pp in _divisors(world // (tp * ulysses)):
                for ring in _divisors(world // (tp * ulysses * pp)):
                    parallel = ParallelConfig(tp=tp, pp=pp, ulysses=ulysses, ring=ring)
                    try:
                        parallel.check_model(model)
                        dp = parallel.data_parallel_size(world)
                    except ValueError:
                        continue
                    for recompute in RECOMPUTE:
                        for dist_opt in (False, True):
                            found.append(Layout(tp, pp, ulysses, ring, dp, recompute, dist_opt))
    return found


def load_model(name_or_path: str) -> ModelConfig:
    """A preset name (configs/model/<name>.yaml) or the path of such a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        return model_preset(name_or_path)
    if not path.is_file():
        raise ConfigError(f"--model {name_or_path}: no such file")
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def plan(
    model: ModelConfig,
    work: Workload,
    nodes: int,
    gpus_per_node: int,
    gpu: str,
    mfu: float = MFU,
) -> list[Plan]:
    """The layouts that fit the GPU's memory, fastest step first (less memory breaks ties)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; choose one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    device = GPUS[gpu]
    world = nodes * gpus_per_node
    candidates = layouts(model, world, gpus_per_node)
    if not candidates:
        raise ConfigError(
            f"no layout of {model.name} fits {world} GPUs: tp and ulysses must divide the heads "
            f"and the {gpus_per_node} GPUs of a node, pp the {model.llm.num_layers} layers"
        )
    limit = USABLE * device.memory_gib * GIB
    plans, smallest = [], None
    for layout in candidates:
        mem = peak_memory(model, layout, work)
        if smallest is None or mem.total < smallest[1].total:
            smallest = (layout, mem)
        if mem.total <= limit:
            plans.append(
                Plan(layout, mem, step_time(model, layout, work, device, gpus_per_node, mfu))
            )
    if not plans:
        layout, mem = smallest
        raise ConfigError(
            f"no layout fits {device.memory_gib:g} GiB: the smallest, {_describe(layout)}, needs "
            f"{mem.gib:.1f} GiB per rank; add nodes, use a GPU with more memory, or shorten the sample"
        )
    plans.sort(key=lambda p: (p.time.total, p.memory.total))
    return plans


def _describe(layout: Layout) -> str:
    return (
        f"tp {layout.tp} pp {layout.pp} ulysses {layout.ulysses} ring {layout.ring} "
        f"dp {layout.dp} recompute {layout.recompute} "
        f"distributed optimizer {'on' if layout.distributed_optimizer else 'off'}"
    )
