"""An asyncio face on the step-level engine, for the server.

The engine runs in one background thread that owns all engine state: requests and aborts reach
it through a command queue, and each request's outputs come back on its own asyncio queue.
Validation (and tokenizing) happens in the caller, so a bad request fails before any stream.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator

from vidya.config import EngineArgs
from vidya.engine.llm_engine import LLMEngine
from vidya.platform import return_freed_memory
from vidya.outputs import RequestOutput
from vidya.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    BURST_GAP_S = 0.01
    BURST_MAX_S = 0.1

    def __init__(self, args: EngineArgs | None = None, engine: LLMEngine | None = None) -> None:
        self.engine = engine or LLMEngine(args or EngineArgs())
        self._commands: queue.Queue = queue.Queue()
        # requests submitted and not yet in the scheduler's queue: each counter has one writer
        # (the event loop, the engine thread), so neither needs a lock
        self._submitted = 0
        self._applied = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self.longest_step_s = 0.0  # (a stop waits for the step it cannot interrupt: this long, at worst)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="vidya-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_alive(self) -> bool:
        """The engine thread runs, has not failed, and every tensor-parallel rank lives."""
        return self._thread.is_alive() and self.error is None and self.engine.workers_alive()

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def num_waiting(self) -> int:
        """Requests queued for the engine: in its waiting queue or not yet handed to it.
        Read from other threads; may be a step old."""
        return len(self.engine.scheduler.waiting) + self._submitted - self._applied

    # ---- caller side -----------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        """Hand a request to the engine now, with no await: a caller that checked the queue's
        length and submits in the same turn of the event loop cannot be overtaken by another.
        Call from the event loop; read the outputs by iterating the returned stream, and close it
        (which aborts the request unless it finished) however the caller ends."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        token_ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.validate(token_ids, params)
        request_id = request_id or self.engine.new_request_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._submitted += 1
        self._commands.put(("add", request_id, token_ids, params, prompt if isinstance(prompt, str) else None))
        return RequestStream(self, request_id, q)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that changed it; the last one is
        finished. Closing the iterator early (a client went away) aborts the request."""
        stream = self.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def fail_open_requests(self, message: str) -> int:
        """End every open request's stream with EngineDeadError(message) (closing their streams
        then aborts them in the engine); a drain that ran out of time calls this. Returns how many."""
        open_ids = list(self._streams)
        for rid in open_ids:
            self._deliver(rid, EngineDeadError(message))
        return len(open_ids)

    @property
    def stop_requested(self) -> bool:
        """stop() or shutdown() was called: the engine thread ending is expected, not a death."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the engine thread to stop after its current step (no new step starts); returns at once."""
        self._stop.set()
        self._commands.put(("wake",))

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the engine thread after its current step; wait at most `timeout` seconds.
        Returns whether it stopped (a long step may still run: the thread is a daemon)."""
        self.stop()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    # ---- engine thread ---------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step, not one per request."""
        by_loop: dict = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, token_ids, params, text = cmd
            try:
                self.engine.add_request(rid, token_ids, params, prompt_text=text)
            except ValueError as e:
                self._deliver(rid, e)
            finally:
                self._applied += 1
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])

    def _gather_burst(self) -> None:
        """The engine was idle and a request came: take the others arriving with it (until a
        gap of BURST_GAP_S, at most BURST_MAX_S) into the same first step. A step of a few
        prompts costs almost as much as one of many, and stepping while the HTTP side is still
        taking requests in makes the two fight for the cores."""
        deadline = time.monotonic() + self.BURST_MAX_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._apply(self._commands.get(timeout=min(self.BURST_GAP_S, left)))
            except queue.Empty:
                return

    def _loop(self) -> None:
        stepped = False
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                    self._apply(cmd)
                    if block:
                        self._gather_burst()
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    if block and stepped:  # idle for 0.5 s after work: give what the burst freed back
                        return_freed_memory()
                        stepped = False
                if self.engine.has_unfinished_requests() and not self._stop.is_set():
                    t0 = time.monotonic()
                    outputs = self.engine.step()
                    self.longest_step_s = max(self.longest_step_s, time.monotonic() - t0)
                    self._deliver_all(outputs)
                    stepped = True
        except BaseException as e:  # the engine died: fail every open stream, loudly
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine stopped: {type(e).__name__}: {e}"))
            raise


class RequestStream:
    """One submitted request's outputs, each cumulative: iterate it once; the last is finished."""

    def __init__(self, llm: AsyncLLM, request_id: str, q: asyncio.Queue) -> None:
        self._llm = llm
        self.request_id = request_id
        self._queue = q
        self._open = True  # registered with the engine and neither finished nor closed

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        q = self._queue
        while self._open:
            item = await q.get()
            while not isinstance(item, BaseException) and not item.finished and not q.empty():
                item = q.get_nowait()  # outputs are cumulative: a slow reader skips to the latest
                #                        (but a finished one is kept over an error behind it)
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._open = False
                self._llm._streams.pop(self.request_id, None)
            yield item

    def close(self) -> None:
        """Abort the request in the engine unless it finished; a second call does nothing."""
        if self._open:
            self._open = False
            self._llm._streams.pop(self.request_id, None)
            self._llm.abort(self.request_id)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
