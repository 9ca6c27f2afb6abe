"""Typed configuration: every knob of a run, one dataclass per component.

Hydra composes `configs/` onto these dataclasses (structured configs), so an unknown key or a
value of the wrong type is an error before anything starts. HF checkpoints are read into the same
`ModelConfig` (see `checkpoint/hf.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from longvila_mcore.errors import ConfigError
from longvila_mcore.models.recompute import check_recompute

log = logging.getLogger(__name__)


@dataclass
class LLMConfig:
    """Qwen2 decoder dimensions (REFERENCE 1)."""

    vocab_size: int = 512
    """Rows of the embedding table (tokenizer size, possibly padded)."""
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Grouped-query attention: query heads share these K/V heads."""
    ffn_hidden_size: int = 128
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float | None = None
    """Linear RoPE scaling: positions are divided by this factor (4.0 in the 1M release)."""
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768


@dataclass
class VisionConfig:
    """SigLIP vision tower dimensions (REFERENCE 1)."""

    image_size: int = 28
    patch_size: int = 14
    hidden_size: int = 32
    num_layers: int = 3
    """Layers in the checkpoint; the features are taken after layer `num_layers + select_layer + 1`."""
    num_attention_heads: int = 2
    ffn_hidden_size: int = 64
    layer_norm_eps: float = 1e-6
    select_layer: int = -2
    """Which hidden state feeds the projector (-2: output of the second-to-last layer)."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    use_head: bool = False
    """The checkpoint holds SigLIP's attention-pooling head (`vision_model.head.*`; HF's
    `vision_use_head`, which defaults to True). It is never used, only kept for the round trip."""

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_used_layers(self) -> int:
        return self.num_layers + self.select_layer + 1


TOKEN_ORDERS = ("raster", "legacy")
"""How `mlp_downsample` orders a frame's tokens (REFERENCE 1): `raster`, row-major over the grid
of 2x2 blocks (VILA from December 2024 on: the Qwen2 LongVILA releases); `legacy`, the transposed
order of VILA before it (VILA1.5, Llama-3 LongVILA-8B)."""


@dataclass
class ModelConfig:
    """The composed LongVILA model: tower -> projector -> decoder."""

    name: str = "longvila_tiny"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_type: str = "mlp_downsample"
    """Only `mlp_downsample` (REFERENCE 1) is implemented."""
    token_order: str = "raster"
    """Order of a frame's projector tokens, one of TOKEN_ORDERS. Nothing in a released checkpoint
    says which one its projector was trained with: `raster` for the Qwen2 LongVILA releases,
    `legacy` for VILA1.5-era `mlp_downsample` checkpoints. Checkpoints of this project record it."""

    def __post_init__(self) -> None:
        check_token_order(self.token_order, "model.token_order")

    @property
    def tokens_per_frame(self) -> int:
        """Projector tokens of one frame, without the trailing newline token."""
        side = self.vision.num_patches_per_side
        half = (side + 1) // 2
        return half * half


def check_token_order(order: str, where: str) -> None:
    """Raise naming `where` (the option that set it) unless `order` is one of TOKEN_ORDERS."""
    if order not in TOKEN_ORDERS:
        raise ConfigError(
            f"{where}={order!r} is not a token order; use raster (the Qwen2 LongVILA releases, "
            "VILA from December 2024 on) or legacy (VILA1.5 and Llama-3 LongVILA-8B checkpoints)"
        )


def with_token_order(model: ModelConfig, explicit: str | None, source: object) -> ModelConfig:
    """`model` as `source` (a checkpoint) records it, with the token order asked for explicitly
    (a flag or an override) when there is one: an explicit choice wins over the record."""
    if explicit is None or explicit == model.token_order:
        return model
    log.warning("%s records token order %s; using %s as asked", source, model.token_order, explicit)
    return dataclasses.replace(model, token_order=explicit)


@dataclass
class ParallelConfig:
    """How the ranks of a run are split: world = tp x pp x (ulysses x ring) x dp."""

    tp: int = 1
    """Tensor parallel size (heads and MLP columns split within a node)."""
    pp: int = 1
    """Pipeline parallel size (layers split into stages)."""
    ulysses: int = 1
    """Sequence parallel, all-to-all over heads (inside a node)."""
    ring: int = 1
    """Sequence parallel, point-to-point ring over sequence blocks (across nodes)."""
    sequence_parallel: bool = True
    """Megatron's sequence parallelism inside the tensor-parallel group (with tp > 1): the
    decoder's norms and residuals hold 1/tp of the tokens of this rank's shard. No effect at
    tp 1."""

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def tp_sequence_parallel(self) -> bool:
        """Megatron's sequence parallelism is on (it needs tp > 1)."""
        return self.sequence_parallel and self.tp > 1

    @property
    def tp_split(self) -> int:
        """Ranks that split a sequence-parallel shard's tokens further: tp with
        `tp_sequence_parallel`, else 1."""
        return self.tp if self.tp_sequence_parallel else 1

    @property
    def token_split(self) -> int:
        """Ranks a packed sequence's tokens are split over: ulysses x ring x `tp_split`."""
        return self.sp * self.tp_split

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel degree left over by this layout; raises if it does not fit."""
        for name in ("tp", "pp", "ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        per_replica = self.tp * self.pp * self.sp
        if world_size % per_replica:
            raise ConfigError(
                f"world size {world_size} is not divisible by tp x pp x ulysses x ring = "
                f"{self.tp} x {self.pp} x {self.ulysses} x {self.ring} = {per_replica}; "
                "change parallel.* or the number of ranks"
            )
        return world_size // per_replica

    def check_model(self, model: ModelConfig) -> None:
        """Raise if the model's heads and layers cannot be split this way."""
        llm, vision = model.llm, model.vision
        if llm.num_attention_heads % self.tp or llm.num_key_value_heads % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} must divide the LLM's {llm.num_attention_heads} heads and "
                f"{llm.num_key_value_heads} KV heads"
            )
        if vision.num_attention_heads % self.tp:
            raise ConfigError(
                f"parallel.tp={self.tp} must divide the vision tower's "
                f"{vision.num_attention_heads} heads"
            )
        heads_per_rank = llm.num_attention_heads // self.tp
        if heads_per_rank % self.ulysses:
            raise ConfigError(
                f"parallel.ulysses={self.ulysses} must divide the {heads_per_rank} attention heads "
                f"per tensor-parallel rank ({llm.num_attention_heads} heads / tp {self.tp})"
            )
        if llm.num_layers % self.pp:
            divisors = [d for d in range(1, llm.num_layers + 1) if llm.num_layers % d == 0]
            raise ConfigError(
                f"parallel.pp={self.pp} must divide the LLM's {llm.num_layers} layers (each "
                f"pipeline stage gets the same number of decoder layers; the vision tower stays "
                f"whole on the first); use one of {divisors}"
            )


@dataclass
class DataConfig:
    """Where training samples come from (webdataset shards, longvila_mcore/data/FORMAT.md)."""

    name: str = "synthetic"
    """`synthetic`: the generated dataset in the cache (made on first use) fills every empty
    pattern below; any other name: the patterns must be set."""
    caption: str = ""
    """Shards of image-caption samples (stage 1), e.g. `/data/cc3m/cc3m-{000000..000599}.tar`;
    brace ranges and globs expand, several patterns join with `::`."""
    interleaved: str = ""
    """Shards of interleaved image-text documents (stage 2, MMC4 / COYO style)."""
    conversation: str = ""
    """Shards of image or video conversations (stages 3 and 5, LLaVA style)."""
    text: str = ""
    """Shards of pre-tokenised text, int32 token ids (stage 4, SlimPajama)."""
    shuffle_buffer: int = 1000
    """Samples held in the seeded shuffle buffer (0: keep shard order within shards)."""
    num_workers: int = 0
    """Threads decoding samples ahead (0: in the main thread); the stream does not depend on it."""
    video_resize: str = "rgb"
    """How video frames are brought to the tower's size. `rgb`: as VILA prepared the frames the
    released checkpoints saw (each sampled frame decoded to RGB at its own size, then Pillow
    bicubic). `yuv`: swscale resizes while the frame is still YUV 4:2:0; faster (the more so the
    larger the video) but different at colour edges (README, "Video frames")."""
    cache_dir: str | None = None
    """Base directory of the synthetic dataset; default $LONGVILA_CACHE or ~/.cache/longvila_mcore."""
    tokenizer: str | None = None
    """HF tokenizer directory for a model trained from scratch (a loaded or resumed checkpoint
    brings its own); default: the synthetic dataset's."""


TRAINABLE_PARTS = ("vision_tower", "mm_projector", "llm")
DATA_KINDS = ("caption", "interleaved", "conversation", "text")


@dataclass
class StageConfig:
    """One of the five LongVILA stages (REFERENCE 3): what learns, on what, how fast."""

    name: str = "???"
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE_PARTS))
    """Parts that learn, from `vision_tower`, `mm_projector`, `llm`; the rest is frozen."""
    data_kind: str = "conversation"
    """Which sample kind the stage reads: caption, interleaved, conversation or text."""
    lr: float = 2e-5
    """Peak learning rate."""
    lr_schedule: str = "cosine"
    """`cosine` (to `min_lr` at train.max_steps) or `constant`, both after a linear warm-up
    (Megatron's OptimizerParamScheduler)."""
    min_lr: float = 0.0
    """Where the cosine schedule ends."""
    warmup_ratio: float = 0.0
    """Warm-up length as a fraction of train.max_steps (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Warm-up length in steps; takes precedence over warmup_ratio when > 0."""
    weight_decay: float = 0.0
    num_frames: int = 8
    """Frames sampled from each video (uniformly, or at `fps` capped at this)."""
    fps: float | None = None
    """Sample videos at this rate instead of uniformly over the clip."""
    max_length: int = 4096
    """Tokens of one packed micro-batch; longer samples are skipped and counted."""
    rope_theta: float | None = None
    """RoPE base for this stage (stage 4 raises it); None keeps the model's."""

    def check(self) -> None:
        unknown = sorted(set(self.trainable) - set(TRAINABLE_PARTS))
        if unknown or not self.trainable:
            raise ConfigError(
                f"stage.trainable={self.trainable} must be a non-empty subset of {TRAINABLE_PARTS}"
            )
        if self.data_kind not in DATA_KINDS:
            raise ConfigError(f"stage.data_kind={self.data_kind!r} must be one of {DATA_KINDS}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"stage.lr_schedule={self.lr_schedule!r} must be cosine or constant")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"stage.min_lr={self.min_lr} must be between 0 and stage.lr={self.lr}"
            )


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 200
    """Optimizer steps of the run (a resumed run continues up to the same number)."""
    global_batch_size: int = 8
    """Samples per optimizer step, over all data-parallel ranks and accumulation steps."""
    micro_batch_size: int = 4
    """At most this many samples are packed into one forward/backward pass."""
    seed: int = 1234
    """Seeds weight initialisation and the data order."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0: off)."""
    max_consecutive_skipped_steps: int = 5
    """A step whose loss or gradient norm is not finite updates nothing (`skipped_steps` in the
    metrics counts them); this many such steps in a row stop the run (0: never)."""
    distributed_optimizer: bool = True
    """Megatron's distributed optimizer: fp32 master weights and Adam state sharded over the
    data-parallel x sequence-parallel ranks (each holds 1 / (dp x ulysses x ring) of them)."""
    overlap_communication: bool = True
    """Reduce gradients bucket by bucket while the backward pass still runs and, with the
    distributed optimizer, all-gather the updated parameters during the next forward."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    log_interval: int = 1
    """Print a progress line every this many steps (metrics.jsonl gets every step)."""
    lr_scale: float = 1.0
    """Multiplies the stage's learning rate. The stages' rates are those of the released 1.5B
    and 7B models; the tiny model's recipe (configs/recipe/) raises them, as a 64-wide model
    learns well at rates a 7B one diverges at."""
    recompute: str = "none"
    """Activation recomputation in the decoder and the vision tower: `none` keeps every
    activation; `selective` recomputes the attention kernels and the decoder's MLPs in backward;
    `full` keeps only each layer's input and recomputes the layer (models/recompute.py)."""
    recompute_num_layers: int = 0
    """With `full`: recompute only the first this many layers of the tower and of each pipeline
    stage's decoder layers, the others keep their activations; 0: every layer."""

    def __post_init__(self) -> None:
        check_recompute(self.recompute, self.recompute_num_layers)


@dataclass
class RunConfig:
    output_dir: str = "outputs/${stage.name}"
    """Where metrics.jsonl, TensorBoard events and checkpoints/ go; rerunning resumes from it."""
    tensorboard: bool = False
    """Also write TensorBoard events under output_dir/tensorboard."""
    peak_tflops: float = 989.0
    """Peak dense TFLOP/s of one device, the denominator of the `mfu` metric: 989 is an H100
    SXM's in bf16; set your accelerator's (on a CPU run the mfu is only nominal)."""


@dataclass
class CheckpointConfig:
    load: str | None = None
    """Start from these weights (a checkpoint of ours or a VILA-layout HF directory): the previous
    stage. Ignored when output_dir already holds a checkpoint to resume."""
    save_interval: int = 0
    """Save every this many steps (0: off). The run also saves at its end, every
    `save_interval_minutes`, and on SIGTERM / SIGUSR1 before it exits."""
    save_interval_minutes: float = 30.0
    """Save when this many minutes have passed since the last save (0: off), so that a crash
    loses at most this much work whatever the step time."""
    async_save: bool = True
    """Write checkpoints in the background (Megatron's asynchronous save) while training goes
    on; a checkpoint counts only once every rank's writes are done and it is renamed."""
    keep_last: int = 2
    """Checkpoints kept in output_dir/checkpoints (older ones are deleted)."""


@dataclass
class Config:
    """Everything a training run is: `python -m longvila_mcore.train +stage=<name> [overrides]`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def model_preset(name: str) -> ModelConfig:
    """The model `configs/model/<name>.yaml` describes (longvila_tiny, longvila_1.5b, longvila_7b),
    for code outside a Hydra run (benchmarks, tools)."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no model preset {name!r}; choose one of {names}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)
