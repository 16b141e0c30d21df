"""Tensor parallelism (Megatron-style, as vLLM's): one model across N processes on
torch.distributed (gloo on CPU, NCCL on GPUs), one rank per device.

    rank 0 (the engine)                       ranks 1..N-1 (`worker_main`)
    scheduler, block manager, sampler         load their shard, allocate their KV cache
    each step: send the Step (a pipe)  -->  receive it
    forward on its shard                      forward on its shard      (all-reduce / all-gather
    sample from the gathered logits           (its logits go to rank 0)  in the ops, in step)

What each rank holds (`shard_config`): 1/N of the query heads and of the KV heads (so 1/N of the
KV cache), 1/N of the MLP's intermediate columns, 1/N of the vocabulary rows of the embedding and
the output layer.

Rank 0 hands each worker its messages (`Load`, `Profile`, `Cache`, `Step`, `Stop`) over a pipe of
its own, not over a collective: a worker waits for the next step as long as the engine idles
(a collective would time out, gloo's after 120 s), and learns of rank 0's death at once (the
pipe's end). The collectives run only inside a step, where every rank takes part.

q/k/v and gate/up are split by output rows (column-parallel), o_proj and
down_proj by input columns (row-parallel: one all-reduce each, `ops.all_reduce`); the embedding
looks up its own rows and all-reduces, the output layer all-gathers the logits. The loader cuts
each checkpoint tensor to the rank's part by its shape (`shard_of`). The scheduler, the prefix
cache and sampling stay on rank 0 alone.
"""
from __future__ import annotations

import copy
import datetime
import multiprocessing as mp
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vidya.models.llama import head_dim_of
from vidya.platform import Platform, TPGroup

RANK_NAME = "vidya-tp-rank"  # the worker processes' names: rank N is f"{RANK_NAME}{N}"
UNGUARDED_EXIT = 3  # a worker's exit status when its start re-ran the script that creates the engine
READY = b"ready"
RENDEZVOUS_S = 120.0


@dataclass(frozen=True, slots=True)
class Load:
    max_model_len: int


@dataclass(frozen=True, slots=True)
class Profile:
    args: tuple  # profile_forward's arguments after (model, ops, config)


@dataclass(frozen=True, slots=True)
class Cache:
    num_blocks: int
    cache: Any  # config.CacheConfig


@dataclass(frozen=True, slots=True)
class Step:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: Any  # attention.metadata.AttentionMetadata
    logits_indices: torch.Tensor

    @classmethod
    def on_host(cls, input_ids, positions, meta, logits_indices) -> "Step":
        """The step with its tensors in host memory: pickled from a GPU they would come back on
        rank 0's device in every worker (and open a context there); each worker moves them to its own."""
        cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return cls(cpu(input_ids), cpu(positions), meta.map_tensors(cpu), cpu(logits_indices))


@dataclass(frozen=True, slots=True)
class Stop:
    pass


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


def init_group(rank: int, world: int, port: int, platform: Platform) -> TPGroup:
    """Join the group's collectives (`platform.distributed_backend`). Meeting the other ranks may
    take as long as their start (RENDEZVOUS_S at least); a collective inside a step that waits
    longer than `platform.tp_timeout_s` on a rank fails."""
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=max(RENDEZVOUS_S, platform.tp_timeout_s)))
    dist.init_process_group(platform.distributed_backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=platform.tp_timeout_s))
    return TPGroup(rank, world)


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def refuse_in_a_starting_rank() -> None:
    """Called where an engine with several ranks is created. A rank starts with multiprocessing's
    spawn, which first runs the main script again; a script that creates the engine outside
    `if __name__ == "__main__":` would create it again inside the rank. Exit that rank with a
    status rank 0 recognises, rather than start ranks of ranks."""
    if mp.current_process().name.startswith(RANK_NAME):
        print("vidya: error: this tensor-parallel rank re-ran the script that creates the engine; put "
              "that code under `if __name__ == \"__main__\":`", file=sys.stderr, flush=True)
        raise SystemExit(UNGUARDED_EXIT)


def _start_error(rank: int, exitcode: int | None) -> RuntimeError:
    if exitcode == UNGUARDED_EXIT:
        return RuntimeError(
            f"tensor-parallel rank {rank} could not start: it re-ran the script that creates the engine "
            f"(ranks start with multiprocessing's spawn, which imports the main script again). Put the code "
            f"that creates LLM(...) or LLMEngine(...) under `if __name__ == \"__main__\":`")
    return RuntimeError(f"tensor-parallel rank {rank} exited while starting (exit code {exitcode}); "
                        f"its error is printed above")


class Workers:
    """Rank 0's handle on ranks 1..N-1: started before rank 0 loads (they load in parallel),
    sent each message with `send`, stopped with `close`."""

    def __init__(self, args, world: int, platform: Platform) -> None:
        if platform.device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs (one a rank); "
                             f"{torch.cuda.device_count()} visible")
        self.world = world
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(args, platform, rank, world, self.port, theirs), daemon=True,
                            name=f"{RANK_NAME}{rank}")
            p.start()
            theirs.close()  # (only the worker holds its end: its death is an EOF here)
            self.procs.append(p)
            self.conns.append(ours)
        self.timeout = max(RENDEZVOUS_S, platform.tp_timeout_s)
        self.wait("starting")

    def wait(self, doing: str) -> None:
        """Wait until every worker has said it is done `doing` (starting: its spawn re-ran the main
        script without failing; then each start-up message), so that the next collective does not
        wait on a rank still loading or allocating (a collective's timeout is for a step, not for
        a start-up), and a worker that died doing it is an error now."""
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns), start=1):
            waited = 0.0
            while not conn.poll(0.1):
                waited += 0.1
                if not p.is_alive() or waited > self.timeout:
                    break
            try:
                ok = conn.poll(0) and conn.recv_bytes() == READY
            except (EOFError, OSError):
                ok = False
            if not ok:
                p.join(timeout=5)
                self.close(kill=True)
                if p.exitcode is None:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not finish {doing} in {self.timeout:g} s")
                if doing == "starting":
                    raise _start_error(rank, p.exitcode)
                raise RuntimeError(f"tensor-parallel rank {rank} died {doing} (exit code {p.exitcode}); "
                                   f"its error is printed above")

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} died (exit code {p.exitcode})")

    def send(self, msg: Load | Profile | Cache | Step | Stop) -> None:
        """One of rank 0's messages (see worker_main) to every worker."""
        self.check_alive()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:
                raise RuntimeError(f"tensor-parallel rank {rank} died (its pipe is closed)") from None

    def close(self, kill: bool = False) -> None:
        """Tell the workers to stop (or, with `kill`, terminate them) and wait for them. `kill` is
        for a rank 0 whose engine thread may still be inside a collective: the group is left as it
        is (destroying it under a collective can block), the process is about to leave."""
        if not kill:
            stop = pickle.dumps(Stop())
            for p, conn in zip(self.procs, self.conns):  # each live worker, whatever the others
                if p.is_alive():
                    try:
                        conn.send_bytes(stop)
                    except OSError:
                        pass
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns = []
        if not kill and dist.is_initialized():
            dist.destroy_process_group()


def worker_main(args, platform: Platform, rank: int, world: int, port: int, conn) -> None:
    """A rank > 0: the platform rank 0 resolved, its own shard, then rank 0's messages in order:
    Load, Profile (on a GPU), Cache (each answered READY when done), then a Step per step, until
    Stop (or rank 0's end of the pipe closes: rank 0 is gone). Between messages it waits on the
    pipe as long as rank 0 idles."""
    from vidya.engine.model_runner import ModelRunner, model_layout, profile_forward
    from vidya.models import loader
    from vidya.ops import make_ops
    torch.set_num_threads(threads_per_rank(world))
    platform = platform.for_rank(rank)
    conn.send_bytes(READY)  # (started: rank 0 now meets this rank in init_group)
    tp = init_group(rank, world, port, platform)
    src = loader.resolve(args.model)
    shard = shard_config(loader.load_config(src), world)
    qc = loader.load_quant(src, args.quantization, platform.device.type == "cuda")
    ops = make_ops(platform)
    ops.tp = tp
    model = runner = None
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # rank 0 is gone
            break
        if isinstance(msg, Stop):
            break
        if isinstance(msg, Load):
            model = loader.load_model(src, shard, platform.dtype, platform.device, msg.max_model_len,
                                      load_format=args.load_format, tp=tp, qc=qc)
        elif isinstance(msg, Profile):
            profile_forward(model, ops, shard, *msg.args)
        elif isinstance(msg, Cache):
            runner = ModelRunner(model, shard, msg.cache, msg.num_blocks, platform, ops,
                                 model_layout(model, msg.cache.hybrid_kv_cache))
        else:
            runner.forward(msg)
            continue
        conn.send_bytes(READY)
    dist.destroy_process_group()
