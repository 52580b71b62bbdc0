"""AsyncEngine: the LLMEngine step loop in a background thread, with an async stream per request.

The loop thread owns the engine; other threads only enqueue commands (add, abort, callables) and the loop
applies them between steps, so the engine needs no locks. torch releases the GIL inside its kernels, so the
asyncio side (HTTP, Ray Serve) stays responsive while a step runs.

The loop thread also builds the engine, and adapter files load on a one-thread OpenMP team: OpenMP keeps a thread
pool per calling thread, and with a second pool beside the engine's (the model loaded on the caller's thread)
libgomp stops spinning its workers on a 2-core machine; the same single-stream int8 decode ran at 78 instead of
130 tok/s.

On the CPU the engine's threads take every core the replica has, and the first token of a streamed request still
has to go through the replica's event loop, the gateway and the proxy, each a process that needs a core while
the next step holds them all. So after a step that gave a streamed request its first token the loop sleeps
first_token_pause_ms (4 ms; at most once per FIRST_TOKEN_PAUSE_EVERY_S, so at most 5% of the engine's time):
one short streamed completion at bf16 over HTTP, restarts alternating, 54-62 -> 47-56 ms (4 ms) and 57-73 ->
48-63 ms (8 ms). While at most FIRST_TOKEN_PAUSE_ALWAYS_UP_TO requests run, every first token pauses it (the pause
then holds back one or two streams, not a batch): one user's requests back to back, int8, colocated with direct
ingress, 16.5-18.8 -> 10.9-13.1 ms. Non-streaming requests are gathered in the replica anyway, so they never
pause it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from serving.engine.config import EngineConfig
from serving.engine.errors import EngineOverloadedError
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput
from serving.engine.sampling import SamplingParams

log = logging.getLogger("loraplex.engine")
_DONE = object()
FIRST_TOKEN_PAUSE_EVERY_S = 0.08
FIRST_TOKEN_PAUSE_ALWAYS_UP_TO = 2  # running requests at or below which every first token pauses the loop


def _one_thread(fn, *args):
    """fn(*args) with this worker thread's OpenMP teams at one thread: no second pool beside the engine's. Only this
    thread's setting changes (torch.set_num_threads would also change MKL's process-wide count)."""
    import ctypes

    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)  # the runtime torch and our kernels already loaded
    except (OSError, AttributeError):  # another OpenMP runtime: leave the thread as it is
        pass
    return fn(*args)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._awaiting_first: set[str] = set()  # streamed requests (coalesce_s 0) whose first token is not out yet
        self._last_pause = 0.0
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine, config or EngineConfig(), built),
                                        name="loraplex-engine", daemon=True)
        self._thread.start()
        built.result()  # the engine is loaded (or its load error is raised here)

    def _run(self, engine: LLMEngine | None, config: EngineConfig, built: Future) -> None:
        try:
            self.engine = engine or LLMEngine(config)
            self.config = self.engine.config
            pause = self.config.first_token_pause_ms
            if pause is None:
                pause = 4.0 if self.engine.device.type == "cpu" else 0.0
            self.first_token_pause_s = pause / 1000
            self._stats = self.engine.stats()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    # ---- properties the server reads ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def identity(self):
        return self.engine.identity

    @property
    def system_fingerprint(self) -> str:
        return self.engine.system_fingerprint

    def stats(self) -> dict:
        """A snapshot refreshed after every step (safe to read from any thread)."""
        return dict(self._stats)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

    # ---- the loop thread ------------------------------------------------------------------------------
    def _emit(self, out: RequestOutput | BaseException | object, request_id: str, last: bool = False) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        if last:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed
            pass

    def _apply(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, request_id, prompt, params, lora_name, resume = cmd
            try:
                self.engine.add_request(prompt, params, request_id, lora_name, resume)
            except BaseException as exc:  # reported to that request's consumer
                self._emit(exc, request_id, last=True)
        elif kind == "abort":
            self.engine.abort(cmd[1])
            self._emit(_DONE, cmd[1], last=True)
        elif kind == "call":
            fn, fut = cmd[1], cmd[2]
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:
                fut.set_exception(exc)

    def _loop(self) -> None:
        from serving.engine.llm_engine import apply_num_threads

        apply_num_threads(self.config)
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                self._apply(cmd)
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a bug or device failure: fail every request, keep the loop alive
                log.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._emit(exc, request_id, last=True)
                continue
            firsts = False
            for out in outputs:
                if out.request_id in self._awaiting_first:
                    self._awaiting_first.discard(out.request_id)
                    firsts = True
                self._emit(out, out.request_id, last=out.finished)
            self._stats = self.engine.stats()
            if firsts:
                self._pause_for_first_token()

    def _pause_for_first_token(self) -> None:
        """See the module docstring: leave the cores to the serving path for a moment, at most so often."""
        import time

        now = time.monotonic()
        few = self._stats.get("num_running", 0) <= FIRST_TOKEN_PAUSE_ALWAYS_UP_TO
        if self.first_token_pause_s > 0 and (few or now - self._last_pause >= FIRST_TOKEN_PAUSE_EVERY_S):
            time.sleep(self.first_token_pause_s)
            self._last_pause = time.monotonic()

    def run_in_engine(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread between steps (adapter loading, cache inspection)."""
        fut: Future = Future()
        self._commands.put(("call", fn, fut))
        return fut

    # ---- the async API --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       lora_name: str | None = None, resume: dict[int, list[int]] | None = None,
                       coalesce_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutput deltas. Leaving the loop early (break, cancel, disconnect) aborts the request.
        `resume`: see LLMEngine.add_request. Deltas already waiting are merged into one; with `coalesce_s`, each
        delta after the first also gathers the next ones for that long (the first, and the last, go at once)."""
        request_id = request_id or uuid.uuid4().hex
        if self._stats["num_waiting"] + self._commands.qsize() >= self.config.max_waiting:
            raise EngineOverloadedError(f"model {self.name!r} has {self.config.max_waiting} requests waiting; "
                                        "retry later", retry_after=1.0)
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._streams[request_id] = (loop, q)
        if coalesce_s <= 0:
            self._awaiting_first.add(request_id)
        self._commands.put(("add", request_id, prompt, params, lora_name, resume))
        finished, held, first = False, None, True
        try:
            while True:
                item = held if held is not None else await q.get()
                held = None
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                deadline = None if first else loop.time() + coalesce_s
                while not item.finished:
                    try:
                        nxt = q.get_nowait()
                    except asyncio.QueueEmpty:
                        wait = deadline - loop.time() if deadline is not None else 0.0
                        if wait <= 0:
                            break
                        try:
                            nxt = await asyncio.wait_for(q.get(), wait)
                        except asyncio.TimeoutError:
                            break
                    if nxt is _DONE or isinstance(nxt, BaseException):
                        held = nxt  # after this delta
                        break
                    item = item.merged(nxt)
                first = False
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._awaiting_first.discard(request_id)
            if not finished:
                self._streams.pop(request_id, None)
                self._commands.put(("abort", request_id))

    async def add_lora(self, name: str, source: str, force: bool = False) -> None:
        """Load an adapter off the request path: files are read in a worker thread while steps go on, then
        registered between two steps."""
        import time

        manager = self.engine._lora()
        manager.reserve(name, source, force)
        start = time.monotonic()
        try:
            weights = await asyncio.to_thread(_one_thread, manager.load, name, source, force)
        except BaseException:
            manager.unregister(name)
            raise
        await asyncio.wrap_future(self.run_in_engine(lambda e: manager.register(weights, time.monotonic() - start)))

    async def remove_lora(self, name: str) -> None:
        await asyncio.wrap_future(self.run_in_engine(lambda e: e.remove_lora(name)))

    def list_loras(self) -> list:
        return self.engine.lora.list() if self.engine.lora is not None else []

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)
