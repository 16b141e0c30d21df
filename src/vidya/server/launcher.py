"""`vidya serve`: one process, uvicorn in front, the engine loop in a background thread.

Lifecycle:
  1. the port opens at once; the model loads in a thread (`/health` 503 until it is ready);
  2. serving;
  3. SIGTERM (or Ctrl-C): `/health` and new requests answer 503, requests in flight finish,
     for at most `--shutdown-timeout` seconds; those still open then end with a 503 error
     (event) and the engine is told to stop after its current step, which cannot be cut short.
     The process exits 0 within the timeout plus a few seconds of its own, whatever the step:

        signal ... timeout | cut: errors sent (<= CUT_GRACE_S), connections closed (<= CLOSE_GRACE_S)
                           | the engine stops between steps (<= ENGINE_STOP_S), else is left running
                           | exit (os._exit under a step still running: a step can take seconds on a
                           |       small CPU, and nothing it would compute is wanted any more)

     A second signal exits at once (status 128 + the signal).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import uvicorn

from vidya.config import EngineArgs
from vidya.engine.async_llm import AsyncLLM
from vidya.engine.llm_engine import LLMEngine, engine_platform
from vidya.models import loader
from vidya.platform import Platform
from vidya.server.app import ServerSettings, ServerState, build_app
from vidya.server.serving import Serving
from vidya.tutor.warmup import system_prefixes

log = logging.getLogger("vidya.server")

CUT_GRACE_S = 1.0  # after the drain's deadline, time for the cut requests to send their error
CLOSE_GRACE_S = 1.0  # then uvicorn's wait for connections still open (uvicorn's graceful shutdown)
ENGINE_STOP_S = 0.5  # then the engine thread's wait to stop between steps


class DrainingServer(uvicorn.Server):
    """uvicorn, but a stop signal first drains: the socket stays open so load balancers and
    clients get a clear 503 instead of a refused connection."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.drain_started: float | None = None
        self.cut_at: float | None = None
        self.engine_died = False

    def handle_exit(self, sig: int, frame) -> None:  # runs in the signal handler
        if self.drain_started is not None:
            # a second signal: whatever runs (a long engine step, tasks being cancelled) is dropped
            print(f"vidya: second signal, exiting now ({self.state.in_flight} requests cut)", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        self.drain_started = time.monotonic()
        self.state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        llm = self.state.llm
        if llm is not None and not llm.is_alive and not self.engine_died and not (llm.stop_requested and llm.error is None):
            # the engine (or a tensor-parallel rank) died: exit non-zero so that the pod restarts
            self.engine_died = True
            print(f"vidya: the engine stopped ({llm.error or 'a tensor-parallel rank died'}); exiting",
                  file=sys.stderr, flush=True)
            llm.fail_open_requests("the engine stopped; retry the request")
            return True
        if self.drain_started is None:
            return False
        now = time.monotonic()
        if self.state.in_flight and self.cut_at is None and now - self.drain_started > self.shutdown_timeout:
            # out of time: the requests still open end now, each with a 503 error (event)
            self.cut_at = now
            print(f"vidya: {self.shutdown_timeout:g} s passed, cutting {self.state.in_flight} requests",
                  file=sys.stderr, flush=True)
            if self.state.llm is not None:
                self.state.llm.stop()  # no step after the one now running: the cut's graces overlap it
                self.state.llm.fail_open_requests("the server is shutting down; retry the request")
        done = self.state.in_flight == 0 or (self.cut_at is not None and now - self.cut_at > CUT_GRACE_S)
        if done:
            step = f"; the engine's longest step took {self.state.llm.longest_step_s:.2f} s" if self.state.llm else ""
            print(f"vidya: drained in {now - self.drain_started:.1f} s ({self.state.in_flight} requests still "
                  f"open{step}), exiting",
                  file=sys.stderr, flush=True)
        return done


def load_engine(args: EngineArgs, platform: Platform, settings: ServerSettings, state: ServerState,
                server: DrainingServer) -> None:
    try:
        engine = LLMEngine(args, platform)
        if settings.warm_tutor_prompts:
            t0 = time.perf_counter()
            prefixes = system_prefixes(engine)
            # (a prompt that cannot run, longer than --max-model-len, is left out: no tutor conversation starts with it)
            cached, left_out = engine.warm_prefix_cache(prefixes)
            print(f"vidya: tutor system prompts in the prefix cache ({cached} tokens, "
                  f"{time.perf_counter() - t0:.1f} s" + (f"; {left_out} of {len(prefixes)} left out, too long "
                  f"for --max-model-len {engine.max_model_len}" if left_out else "") + ")", file=sys.stderr, flush=True)
        llm = AsyncLLM(engine=engine)
        state.llm = llm
        state.serving = Serving(llm, settings.served_model_names, settings.max_tokens_default,
                                settings.max_sequences_per_request, settings.max_logprob_entries)
        # (the engine's own start-up line said why a faster path is not used, where one is not)
        print(f"vidya: serving {', '.join(settings.served_model_names)} on {llm.engine.platform.describe(note=False)}",
              file=sys.stderr, flush=True)
    except BaseException as e:  # noqa: BLE001 - reported, then the process exits non-zero
        state.load_error = f"{type(e).__name__}: {e}"
        print(f"vidya: error: the model failed to load: {e}", file=sys.stderr, flush=True)
        server.should_exit = True


def serve(args: EngineArgs, settings: ServerSettings, host: str, port: int, *,
          shutdown_timeout: float = 30.0, timeout_keep_alive: int = 75, log_level: str = "info",
          access_log: bool = True) -> int:
    loader.resolve(args.model)  # a wrong --model fails here, before the port opens
    platform = engine_platform(args)  # an impossible device or backend too; decided once, here
    state = ServerState()
    app = build_app(settings, state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=CLOSE_GRACE_S,
                            lifespan="off")
    server = DrainingServer(config, state, shutdown_timeout)
    threading.Thread(target=load_engine, args=(args, platform, settings, state, server), name="vidya-load", daemon=True).start()
    _lower_priority_of_this_thread()
    server.run()
    code = 1 if state.load_error or not server.started or server.engine_died else 0
    if state.llm is not None and not state.llm.shutdown(timeout=ENGINE_STOP_S):
        # a step still runs (in C++ code): leave without finalizing the interpreter under it
        print("vidya: the engine is inside a step; exiting without it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        state.llm.engine.close(kill=True)
        os._exit(code)
    if state.llm is not None:
        state.llm.engine.close()  # tensor-parallel workers, if any
    return code


def _lower_priority_of_this_thread(niceness: int = 10) -> None:
    """The HTTP event loop yields the CPU to the engine thread (created before this call, so it
    keeps the normal priority): on a small CPU every cycle the loop takes from a step stalls all
    of the step's threads. Linux sets niceness per thread; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass
