"""Tensor parallelism (Megatron-style, as vLLM's): one model across N processes on
torch.distributed (gloo on CPU, NCCL on GPUs), one rank per device.

    rank 0 (the engine)                       ranks 1..N-1 (`worker_main`)
    scheduler, block manager, sampler         load their shard, allocate their KV cache
    each step: broadcast the ModelInput  -->  receive it
    forward on its shard                      forward on its shard      (all-reduce / all-gather
    sample from the gathered logits           (its logits go to rank 0)  in the ops, in step)

What each rank holds (`shard_config`): 1/N of the query heads and of the KV heads (so 1/N of the
KV cache), 1/N of the MLP's intermediate columns, 1/N of the vocabulary rows of the embedding and
the output layer. q/k/v and gate/up are split by output rows (column-parallel), o_proj and
down_proj by input columns (row-parallel: one all-reduce each, `ops.all_reduce`); the embedding
looks up its own rows and all-reduces, the output layer all-gathers the logits. The loader cuts
each checkpoint tensor to the rank's part by its shape (`shard_of`). The scheduler, the prefix
cache and sampling stay on rank 0 alone.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import multiprocessing as mp
import os
import socket
import torch
import torch.distributed as dist

from vidya.models.llama import head_dim_of
from vidya.platform import TPGroup

TIMEOUT = datetime.timedelta(seconds=120)  # a collective waiting longer than this on a dead rank fails


def shard_config(config, world: int):
    """The model config one rank builds: heads, KV heads, intermediate size and vocabulary divided
    by `world` (head_dim kept). Refuses, naming the numbers, what does not divide."""
    if world == 1:
        return config
    parts = {"attention heads": config.num_attention_heads, "KV heads": config.num_key_value_heads,
             "intermediate size": config.intermediate_size, "vocabulary": config.vocab_size}
    bad = [f"{name} {n}" for name, n in parts.items() if n % world]
    if bad:
        raise ValueError(f"tensor_parallel_size {world} does not divide the model's {', '.join(bad)}; "
                         f"use a size that divides them")
    out = copy.deepcopy(config)
    out.head_dim = head_dim_of(config)
    out.num_attention_heads //= world
    out.num_key_value_heads //= world
    out.intermediate_size //= world
    out.vocab_size //= world
    return out


def shard_of(tensor: torch.Tensor, shape: tuple[int, ...], tp: TPGroup) -> torch.Tensor:
    """The rank's part of a checkpoint tensor whose full shape is `world` times `shape` along one
    dimension: rows (column-parallel projections, the vocabulary) or columns (row-parallel)."""
    if tp.world_size == 1 or tuple(tensor.shape) == tuple(shape):
        return tensor
    for dim in range(tensor.dim()):
        if (tensor.shape[dim] == shape[dim] * tp.world_size
                and tensor.shape[:dim] + tensor.shape[dim + 1:] == tuple(shape[:dim]) + tuple(shape[dim + 1:])):
            return tensor.narrow(dim, tp.rank * shape[dim], shape[dim])
    return tensor  # the caller's shape check names the mismatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, port: int, device: torch.device) -> TPGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    return TPGroup(rank, world)


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


class Workers:
    """Rank 0's handle on ranks 1..N-1: started before rank 0 loads (they load in parallel),
    given each step's input, stopped with `close`."""

    def __init__(self, args, world: int, platform) -> None:
        self.world = world
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, args=(args, platform, rank, world, self.port), daemon=True,
                                  name=f"vidya-tp-rank{rank}") for rank in range(1, world)]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} died (exit code {p.exitcode})")

    def broadcast(self, payload) -> None:
        """One of rank 0's messages (see worker_main) to every worker."""
        self.check_alive()
        dist.broadcast_object_list([payload], src=0)

    def close(self, kill: bool = False) -> None:
        """Tell the workers to stop (or, with `kill`, terminate them) and wait for them."""
        try:
            if not kill and all(p.is_alive() for p in self.procs):
                dist.broadcast_object_list([None], src=0)
        except Exception:  # noqa: BLE001 - a dead worker: terminate the rest below
            pass
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(args, platform, rank: int, world: int, port: int) -> None:
    """A rank > 0: the platform rank 0 resolved, its own shard, then what rank 0 broadcasts, in order:
    ("load", max_model_len), ("profile", profile_forward's arguments) on a GPU, ("cache",
    num_blocks, cache config), then ("step", StepInput) per step, until None."""
    from vidya.engine.model_runner import ModelRunner, profile_forward
    from vidya.models import loader
    from vidya.ops import make_ops
    torch.set_num_threads(threads_per_rank(world))
    if platform.device.type == "cuda":  # one GPU per rank (untested: no machine with several was lent)
        platform = dataclasses.replace(platform, device=torch.device("cuda", rank))
        torch.cuda.set_device(platform.device)
    tp = init_group(rank, world, port, platform.device)
    src = loader.resolve(args.model)
    shard = shard_config(loader.load_config(src), world)
    ops = make_ops(platform)
    ops.tp = tp
    model = runner = None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
        if msg is None:
            break
        if msg[0] == "load":
            model = loader.load_model(src, shard, platform.dtype, platform.device, msg[1],
                                      load_format=args.load_format, tp=tp)
        elif msg[0] == "profile":
            profile_forward(model, ops, shard, *msg[1])
        elif msg[0] == "cache":
            runner = ModelRunner(model, shard, msg[2], msg[1], platform, ops)
        else:
            runner.forward(msg[1])
    dist.destroy_process_group()
