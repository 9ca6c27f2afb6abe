"""Convert released HF checkpoints (VILA layout) to this project's checkpoints and back.

hf-to-mcore
    The calling process checks the whole checkpoint first: configs, projector type, the parallel
    layout, every tensor's name and shape against the model (built on the meta device, so without
    memory). Then it starts tp x pp local gloo processes. Each builds its shard of `LongVILAModel`
    without random initialisation and in the checkpoint's dtype (a bf16 7B model is 15 GB over
    all ranks), fills it tensor by tensor through the Rules of `mapping.py` (memory-mapped
    safetensors, fused, sliced for its rank), and the ranks write the checkpoint together with
    `dist.save_checkpoint`: exactly what training writes and loads, so `checkpoint.load=DIR` and
    `generate --load DIR` read it under any tp / pp (dist_checkpointing reshards on load).

mcore-to-hf
    One process and no model: the tensors are read from the distributed checkpoint about 1 GiB
    at a time (a layer's slice of the stacked layer tensors at a time), split back by the same
    Rules and written per component under the released names (the tower's with the
    `vision_model.` prefix) by `hf_export.py`.

`longvila.json` keeps under "hf" what the Megatron side does not need but the HF side had: the
original config files and each component's dtype. mcore-to-hf writes every field the ModelConfig
decides over them, so users get back the configs they had; a checkpoint without "hf" (trained
from scratch) gets the releases' defaults.

Both directions write to `<out>.incomplete` and rename it at the end. On any failure, Ctrl-C
included, the temporary directory is removed; an existing non-empty `out` is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue as queue_lib
import re
import shutil
import socket
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from longvila_mcore.checkpoint.dist import (
    FORMAT_FILE,
    INCOMPLETE,
    model_config,
    read_meta,
    save_checkpoint,
    tokenizer_dir,
)
from longvila_mcore.checkpoint.hf import (
    COMPONENTS,
    CONFIG_FILES,
    SafetensorsReader,
    check_layout,
    dtype_name,
    hf_origin,
    load_tokenizer,
    longvila_rules,
    read_config_and_tokenizer,
    stage_rules,
    tokenizer_files,
    unused_tensors,
)
from longvila_mcore.checkpoint.hf_export import (
    MAX_SHARD_BYTES,
    SafetensorsFiles,
    hf_configs,
    write_tokenizer,
)
from longvila_mcore.checkpoint.mapping import Rule
from longvila_mcore.checkpoint.tensors import (
    CheckpointError,
    fuse,
    global_parameter_names,
    load_full_tensors,
)
from longvila_mcore.config import ModelConfig, ParallelConfig, with_token_order
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.models.projector import SUPPORTED_PROJECTORS
from longvila_mcore.runtime import init_distributed, init_model_parallel

log = logging.getLogger(__name__)

LOAD_BATCH_BYTES = 2**30
"""Tensors mcore-to-hf reads from the distributed checkpoint in one go."""

# --- shared by both directions ------------------------------------------------------------------


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"output directory {out} already exists and is not empty: choose another one or "
            "remove it"
        )
    return out


def _temporary(out: Path) -> Path:
    return out.with_name(out.name + INCOMPLETE)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _one_process_groups() -> None:
    """Megatron's model-parallel state for this single process (even a meta model needs it)."""
    init_distributed(torch.device("cpu"))
    if dist.get_world_size() != 1:
        raise CheckpointError(
            "run the conversion as one process (not under torchrun): hf-to-mcore starts its "
            "tp x pp ranks itself"
        )
    init_model_parallel(ParallelConfig())


def _model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The full (unsplit) shape of every parameter, from a model built on the meta device."""
    with torch.device("meta"):
        model = LongVILAModel(cfg, ParallelConfig(), torch.device("cpu"), initialize=False)
    return {name: p.shape for name, p in global_parameter_names(model).items()}


# --- HF -> Megatron -----------------------------------------------------------------------------


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    progress: bool = False,
    token_order: str | None = None,
) -> Path:
    """Convert a VILA-layout checkpoint into a checkpoint of ours, written by tp x pp ranks.

    `token_order`: the projector's token order, recorded in the checkpoint (None: the one the
    HF directory records, else raster, the order of the Qwen2 LongVILA releases)."""
    out = _check_out(out)
    root = check_layout(hf_dir)
    cfg, _, _ = read_config_and_tokenizer(root, token_order)
    parallel = ParallelConfig(tp=tp, pp=pp)
    try:
        parallel.data_parallel_size(tp * pp)
        parallel.check_model(cfg)
    except ValueError as err:
        raise CheckpointError(f"tp {tp} x pp {pp} does not fit {root}: {err}") from err
    reader = SafetensorsReader(root)
    rules = longvila_rules(cfg, tp=1)
    reader.check_complete(rules, unused_tensors(cfg))
    _one_process_groups()
    _check_hf_shapes(reader, rules, _model_shapes(cfg))

    dtypes = {c: reader.dtype(c) for c in COMPONENTS}
    # One dtype for the model: the checkpoint's, or float32 (holding every value exactly) when
    # the components differ; each comes back in its own dtype from mcore-to-hf.
    dtype = dtypes["llm"] if len(set(dtypes.values())) == 1 else torch.float32
    meta = {"hf": hf_origin(root, reader)}
    log.info(
        "converting %s to %s: tp %d x pp %d, %s, %s token order",
        root,
        out,
        tp,
        pp,
        dtype_name(dtype),
        cfg.token_order,
    )
    with _removed_on_failure(_temporary(out)):
        _spawn_ranks(tp * pp, _write_shard, root, out, cfg, parallel, dtype, meta, progress)
    return out


def _check_hf_shapes(
    reader: SafetensorsReader, rules: list[Rule], shapes: dict[str, torch.Size]
) -> None:
    """Fuse the tensors' shapes (meta tensors from the file headers) and compare with the model."""
    for rule in rules:
        parts = [torch.empty(reader.shape(rule.component, n), device="meta") for n in rule.hf]
        fused = fuse(rule, parts).shape
        if fused != shapes[rule.mcore]:
            found = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(rule.hf, parts))
            raise CheckpointError(
                f"{rule.component}/ tensor(s) {found} do not fit {rule.mcore} "
                f"{tuple(shapes[rule.mcore])}: the checkpoint and its config disagree"
            )


def _write_shard(
    root: Path,
    out: Path,
    cfg: ModelConfig,
    parallel: ParallelConfig,
    dtype: torch.dtype,
    meta: dict[str, Any],
    progress: bool,
) -> None:
    """One rank of hf-to-mcore: its shard of the model, filled from the HF files, then saved."""
    init_model_parallel(parallel)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = LongVILAModel(
        cfg,
        parallel,
        torch.device("cpu"),
        dtype,
        pre_process=stage == 0,
        post_process=stage == parallel.pp - 1,
        initialize=False,
    )
    load_full_tensors(
        model,
        stage_rules(cfg, parallel.tp),
        SafetensorsReader(root).read,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel.tp,
        progress=progress and dist.get_rank() == 0,
    )
    # The released tokenizer files as they are, unless the media tokens had to be added.
    tokenizer, media = load_tokenizer(root)
    save_checkpoint(out, model, tokenizer if media.added else tokenizer_files(root), meta=meta)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(world: int, fn: Callable[..., None], *args) -> None:
    """Run `fn(*args)` on `world` local gloo ranks; raise the first error a rank reports.

    The ranks are not daemons: dist_checkpointing's save starts worker processes of its own.
    """
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world, port, reports, fn, args))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    try:
        done = 0
        while done < world:
            try:
                rank, error, user_error = reports.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode]
                if dead:
                    raise RuntimeError(
                        f"conversion rank {dead[0][0]} died with exit code {dead[0][1]} "
                        "(out of memory?)"
                    ) from None
                continue
            if error is not None:
                raise (CheckpointError if user_error else RuntimeError)(error)
            done += 1
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                _kill_tree(p.pid)
                p.join()


def _kill_tree(pid: int) -> None:
    """Kill a rank and the processes it started (dist_checkpointing's writers and queue
    manager), which would otherwise outlive it."""
    with contextlib.suppress(psutil.NoSuchProcess):
        rank = psutil.Process(pid)
        for process in [*rank.children(recursive=True), rank]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _rank_main(rank: int, world: int, port: int, reports, fn, args) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # torch.distributed.checkpoint announces the deprecation of the ShardedTensor it uses inside
    # Megatron's dist_checkpointing: nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        init_distributed(torch.device("cpu"))
        fn(*args)
        reports.put((rank, None, False))
    except (CheckpointError, ValueError) as err:
        reports.put((rank, str(err), True))
    except BaseException:
        reports.put((rank, f"rank {rank} failed:\n{traceback.format_exc()}", False))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- Megatron -> HF -----------------------------------------------------------------------------


def mcore_to_hf(
    mcore_dir: str | Path,
    out: str | Path,
    progress: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    token_order: str | None = None,
) -> Path:
    """Write a checkpoint of ours in the VILA layout, tensor batch by tensor batch.

    The token order (`token_order`, else the one the checkpoint records) goes into
    `mm_projector/config.json`, so converting the export back keeps it."""
    out = _check_out(out)
    mcore_dir = Path(mcore_dir)
    meta = read_meta(mcore_dir)
    cfg = with_token_order(model_config(meta, mcore_dir), token_order, mcore_dir)
    if cfg.projector_type not in SUPPORTED_PROJECTORS:
        raise CheckpointError(
            f"{mcore_dir / FORMAT_FILE}: projector type {cfg.projector_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PROJECTORS)})"
        )
    carried = meta.get("hf") or {}
    _one_process_groups()
    plan = _stored_tensors(mcore_dir, cfg)
    dtypes = _export_dtypes(plan, carried.get("dtypes") or {})
    tmp = _temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    with _removed_on_failure(tmp):
        files = {c: SafetensorsFiles(tmp / c, max_shard_bytes) for c in COMPONENTS}
        with tqdm(total=len(plan), desc="tensors", unit="tensor", disable=not progress) as bar:
            for batch in _batches(plan, LOAD_BATCH_BYTES):
                for item, full in zip(batch, _load(mcore_dir, batch)):
                    rule = item.rule
                    for name, tensor in zip(rule.hf, rule.split(full)):
                        files[rule.component].add(name, tensor.to(dtypes[rule.component]))
                    bar.update()
        for f in files.values():
            f.close()
        for key, content in hf_configs(cfg, carried, dtypes).items():
            (tmp / CONFIG_FILES[key]).write_text(json.dumps(content, indent=2) + "\n")
        write_tokenizer(tokenizer_dir(mcore_dir), tmp / "llm")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return out


@dataclass(frozen=True)
class _Stored:
    """Where the Megatron tensor of one rule is in a distributed checkpoint."""

    rule: Rule
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: int | None = None
    """Index into the leading (layer) axis of a stacked key; None for a key of its own."""
    num_layers: int = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def chunk(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of the tensor in the stored one (a layer's slice has a leading 1)."""
        if self.layer is None:
            return (0,) * len(self.shape), self.shape
        return (self.layer,) + (0,) * len(self.shape), (1, *self.shape)


# Megatron's TransformerBlock saves its layers stacked: `...layers.{i}.X` is slice i of the
# checkpoint key `...layers.X` (whose leading axis is the layer).
_LAYER = re.compile(r"(.*\.layers)\.(\d+)\.(.*)")


def _stored_tensors(mcore_dir: Path, cfg: ModelConfig) -> list[_Stored]:
    """Locate every rule's tensor; raise naming any missing, unexpected or misshapen one."""
    stored = dist_checkpointing.load_tensors_metadata(str(mcore_dir))
    shapes = _model_shapes(cfg)
    plan = []
    for rule in longvila_rules(cfg, tp=1):
        key, layer, m = rule.mcore, None, _LAYER.fullmatch(rule.mcore)
        if m and f"{m[1]}.{m[3]}" in stored:
            key, layer = f"{m[1]}.{m[3]}", int(m[2])
        if key not in stored:
            raise CheckpointError(
                f"{mcore_dir} has no tensor {key} (model parameter {rule.mcore}): the "
                f"checkpoint does not match its {FORMAT_FILE}"
            )
        shape, num_layers = tuple(stored[key].global_shape), 1
        if layer is not None:
            num_layers, shape = shape[0], shape[1:]
        # Compared after the split, so that vocabulary padding rows (any tp's) do not count.
        if _split_shapes(rule, shape) != _split_shapes(rule, shapes[rule.mcore]):
            raise CheckpointError(
                f"{mcore_dir}: tensor {key} has shape {tuple(stored[key].global_shape)}, which "
                f"does not fit model parameter {rule.mcore} {tuple(shapes[rule.mcore])} of "
                f"{FORMAT_FILE}"
            )
        plan.append(_Stored(rule, key, shape, stored[key].dtype, layer, num_layers))
    used = Counter(item.key for item in plan)
    for item in plan:
        if item.layer is not None and used[item.key] != item.num_layers:
            raise CheckpointError(
                f"{mcore_dir}: tensor {item.key} holds {item.num_layers} layers but the model of "
                f"{FORMAT_FILE} has {used[item.key]}"
            )
    parts = {name.split(".")[0] for name in shapes}
    unexpected = sorted(k for k in stored if k.split(".")[0] in parts and k not in used)
    if unexpected:
        raise CheckpointError(
            f"{mcore_dir} has {len(unexpected)} model tensor(s) that the model of {FORMAT_FILE} "
            f"does not have, e.g. {unexpected[0]}"
        )
    return plan


def _split_shapes(rule: Rule, shape: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    try:
        return [tuple(t.shape) for t in rule.split(torch.empty(shape, device="meta"))]
    except RuntimeError:
        return None


def _export_dtypes(plan: list[_Stored], carried: dict[str, str]) -> dict[str, torch.dtype]:
    """Each component's dtype: the one recorded at conversion, else the dtype holding most of
    its stored bytes (Megatron keeps norms in float32 in a bf16 model)."""
    dtypes = {}
    for component in COMPONENTS:
        if component in carried:
            dtypes[component] = getattr(torch, carried[component])
            continue
        nbytes = Counter()
        for item in plan:
            if item.rule.component == component:
                nbytes[item.dtype] += item.nbytes
        dtypes[component] = nbytes.most_common(1)[0][0]
    return dtypes


def _batches(plan: list[_Stored], max_bytes: int) -> Iterator[list[_Stored]]:
    batch, size = [], 0
    for item in plan:
        if batch and size + item.nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.nbytes
    if batch:
        yield batch


def _load(mcore_dir: Path, batch: list[_Stored]) -> list[torch.Tensor]:
    """Read the batch's tensors (layer slices of stacked ones) from the checkpoint's files."""
    planner = _ChunkLoadPlanner([(item.key, *item.chunk, item.dtype) for item in batch])
    dcp.load({}, storage_reader=dcp.FileSystemReader(mcore_dir), planner=planner)
    return [t if item.layer is None else t[0] for item, t in zip(batch, planner.buffers.values())]


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """torch.distributed.checkpoint reading chosen regions of stored tensors.

    Megatron's own loader (dist_checkpointing.load) in a single process reads a stored tensor
    only whole, and a stacked layer tensor of a 7B model is up to 7.6 GB (the MLP's fc1); Megatron's
    `torch_dist` checkpoints are torch.distributed.checkpoint directories, so this planner asks for
    one layer's region at a time instead.
    """

    def __init__(self, chunks: list[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]]):
        super().__init__()
        self.buffers = {
            (key, offsets): torch.empty(sizes, dtype=dtype) for key, offsets, sizes, dtype in chunks
        }

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), buffer in self.buffers.items():
            wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buffer.shape)
            stored = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(key, stored, [wanted])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.buffers[(index.fqn, tuple(index.offset))]
