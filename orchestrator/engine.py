"""The engine loop, in the shape of vLLM v1's EngineCore.step:

    plan = scheduler.schedule(now)                      # decide (plain Python, under the lock)
    output = runner.execute(plan)                       # touch tensors (per-request results or errors)
    update = scheduler.update_from_output(plan, output, now)
    sinks                                               # progress, previews, exactly one final answer

New requests join at step boundaries, finished ones leave, and nobody waits for a whole batch. Whatever
fails, every request the engine accepted gets exactly one final answer, and the loop goes on; if it
cannot, the engine closes its intake (new requests fail fast) and says so in `health()`."""

from __future__ import annotations

import logging
import threading
import time

from .errors import ServingError, ShuttingDown
from .request import RequestState, Status
from .runner import PipelineSpec, Runner
from .scheduler import RunnerOutput, StepScheduler, Update

log = logging.getLogger(__name__)

# Consecutive iterations that fail outside the runner's containment before the engine gives up.
MAX_LOOP_FAILURES = 3


class Observer:
    """Hooks for metrics; the Triton adapter exports them on /metrics. Defaults do nothing."""

    def request_done(self, state: RequestState) -> None: ...
    def unet_call(self, bucket: tuple, rows: int, seconds: float) -> None: ...
    def stage(self, stage: str, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def cascade(self, state: RequestState, router) -> None: ...
    def decision(self, decision) -> None: ...
    def loop_error(self) -> None: ...
    def adapter(self, event: str, value) -> None: ...  # LoRA cache: hit, miss, eviction (counts), load (seconds)


class Engine:
    def __init__(self, scheduler: StepScheduler, runner, *, model: str = "pipeline", clock=time.monotonic,
                 observer: Observer | None = None, stuck_after_s: float = 180.0):
        self.scheduler, self.runner, self.model, self.clock = scheduler, runner, model, clock
        self.stuck_after_s = stuck_after_s  # with work waiting, no iteration for this long means a wedged loop
        self.observer = observer or Observer()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failures = 0  # consecutive iterations that failed outside the runner
        self.broken: str | None = None  # why the loop gave up, if it did
        self.last_iteration: float | None = None
        self._sending_since: float | None = None  # a sink call in progress (they should take microseconds)
        self._tail_s = 0.0  # the previous iteration's time after its runner (lock wait, updates, answers)
        self.send_stuck_s = 10.0

    # ---- intake (any thread) -------------------------------------------------------------
    def submit(self, state: RequestState) -> None:
        """Queue a request; raises a ServingError (queue full, SLO infeasible, closed) at once."""
        with self._cv:
            try:
                self.scheduler.add(state, self.clock())
            except ServingError as exc:
                state.error = exc
                state.enter(Status.REJECTED, self.clock())
                self.observer.request_done(state)
                raise
            self.observer.queue_depth(self.scheduler.queue_depth)
            self._cv.notify()

    def cancel(self, request_id: str) -> bool:
        with self._cv:
            found = self.scheduler.cancel(request_id)
            self._cv.notify()
            return found

    def health(self) -> dict:
        with self._cv:
            running = self._thread is not None and self._thread.is_alive()
            age = None if self.last_iteration is None else self.clock() - self.last_iteration
            broken = self.broken
            if broken is None and self.scheduler.has_work and age is not None and age > self.stuck_after_s:
                broken = f"no iteration for {age:.0f} s with requests waiting"
            sending = self._sending_since
            if broken is None and sending is not None and time.monotonic() - sending > self.send_stuck_s:
                broken = f"a response has been sending for {time.monotonic() - sending:.0f} s"
            return {"ok": broken is None and (running or self._thread is None), "broken": broken,
                    "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                    "closed": self.scheduler.closed is not None, "last_iteration_age_s": age}

    def profile(self) -> dict:
        """The latency model learned so far (profile.json's format), the measured/predicted iteration scale and
        the other learned state, and where the cascade's load controller stands (if it has one)."""
        with self._cv:
            controller = self.scheduler.controller
            return {**self.scheduler.predictor.to_profile(), "iteration_scale": self.scheduler.iteration_scale,
                    "side_share": self.scheduler.side_share,
                    "forecast_bias": dict(self.scheduler.forecast_bias),
                    "stop_fraction": {f"{model}/{level}": round(v, 4)
                                      for (model, level), v in sorted(self.scheduler.stop_fraction.items())},
                    **({"controller": controller.state(self.clock())} if controller is not None else {})}

    # ---- loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self.last_iteration = self.clock()
        self._thread = threading.Thread(target=self._run, name="triffusion-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Stop admitting: new requests get UNAVAILABLE; the ones in flight go on."""
        with self._cv:
            self.scheduler.close(ShuttingDown())

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let those in flight finish for up to `grace_s`, fail the rest, stop."""
        self.drain()
        deadline = time.monotonic() + grace_s
        with self._cv:
            while self.scheduler.has_work and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
        self._fail_everything(ShuttingDown("server is shutting down; the request did not finish in time"))
        self.runner.close()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.scheduler.has_work and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
                self._failures = 0
            except Exception:  # noqa: BLE001 - a bug outside the runner's containment
                log.exception("engine iteration failed")
                self.observer.loop_error()
                self._failures += 1
                self._fail_everything(ServingError("the request failed inside the server (an internal error); "
                                                   "retry it"))
                if self._failures >= MAX_LOOP_FAILURES:
                    self.broken = f"{self._failures} consecutive iterations failed"
                    with self._cv:
                        self.scheduler.close(ServingError("the orchestrator is restarting; retry shortly",
                                                          code=ShuttingDown.code, reason="restarting"))
                    return

    def step(self) -> bool:
        """One iteration on the caller's thread (tests and the simulator drive the engine this way)."""
        started = self.clock()
        with self._cv:  # waits for admissions in progress: they take the same lock
            plan = self.scheduler.schedule(self.clock())
            self.observer.queue_depth(self.scheduler.queue_depth)
            if plan.decision is not None:
                self.observer.decision(plan.decision)
        try:
            output = self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - the runner contains per request; this is a bug in it
            log.exception("runner failed on a whole plan")
            error = ServingError(f"the request failed inside the server ({type(exc).__name__}); retry it")
            output = RunnerOutput(errors={state: error for state in plan.requests})
        tail_started = self.clock()
        # What an iteration really costs, for admission: from its start to the runner's end, plus the
        # previous iteration's tail (waiting for the lock, state updates, answers), which this one waited on.
        output.iteration_s = tail_started - started + self._tail_s
        with self._cv:
            update = self.scheduler.update_from_output(plan, output, self.clock())
            self.last_iteration = self.clock()
            self._cv.notify_all()  # stop() waits for the scheduler to empty
        self.runner.release(update.finished + update.failed)
        try:  # metrics are not worth an answer: a failing observer must not stop the answers below
            self._observe(output, update)
        except Exception:  # noqa: BLE001
            log.exception("observer failed")
        self._emit(output, update)
        self._tail_s = self.clock() - tail_started
        return not plan.empty

    def _fail_everything(self, error: ServingError) -> None:
        with self._cv:
            states = self.scheduler.drain_all()
        for state in states:
            state.error = error
            state.enter(Status.FAILED, self.clock())
            self._answer(state, lambda s=state: s.sink.fail(error))
            self.observer.request_done(state)
        self.runner.release(states)

    # ---- sinks ----------------------------------------------------------------------------
    def _observe(self, output: RunnerOutput, update: Update) -> None:
        for bucket, rows, seconds in output.unet_calls:
            self.observer.unet_call(bucket, rows, seconds)
        for stage, _, seconds in output.stages:
            self.observer.stage(stage, seconds)
        for state in update.routed:
            self.observer.cascade(state, self.scheduler.router)

    def _emit(self, output: RunnerOutput, update: Update) -> None:
        for state in update.progress:
            self._send(state, lambda s=state: s.sink.progress(s.steps_done, s.steps_target))
        for state in update.previews:
            self._send(state, lambda s=state: s.sink.preview(output.previews[s]))
        for state in update.finished:
            image = output.images[state]
            self._answer(state, lambda s=state: s.sink.finish(image, self.metadata(s)))
            self.observer.request_done(state)
        for state in update.failed:
            self._answer(state, lambda s=state: s.sink.fail(s.error))
            self.observer.request_done(state)

    def _send(self, state: RequestState, send) -> None:
        """A progress or preview message; if the sink cannot take it, the client is gone: stop the work."""
        self._sending_since = time.monotonic()
        try:
            send()
        except Exception as exc:  # noqa: BLE001
            log.warning("sink of %s failed (%s); cancelling it", state.request_id, exc)
            state.cancel_requested = True
        finally:
            self._sending_since = None

    def _answer(self, state: RequestState, send) -> None:
        """The one final answer of a request: never twice, and a sink that raises cannot stop the loop."""
        if state.answered:
            log.error("request %s was already answered; dropping a second final answer", state.request_id)
            return
        state.answered = True
        self._sending_since = time.monotonic()
        try:
            send()
        except Exception as exc:  # noqa: BLE001
            log.warning("final answer of %s could not be sent (%s)", state.request_id, exc)
        finally:
            self._sending_since = None

    def metadata(self, state: RequestState) -> dict:
        t = state.times
        ms = lambda a, b: round((t[b] - t[a]) * 1000.0, 3) if a in t and b in t else None
        p = state.params
        router, cascade = self.scheduler.router, self.scheduler.cascade
        total = round((t["finished"] - state.arrival) * 1000.0, 3) if "finished" in t else None
        return {
            "request_id": state.request_id,
            "model": self.model,
            "unet": state.model,
            "seed": p.seed,
            "steps": p.steps,
            "steps_done": state.steps_done,
            "early_stop": state.early_stop,
            "scheduler": p.scheduler,
            "guidance_scale": p.guidance_scale,
            "height": p.height,
            "width": p.width,
            "slo_ms": p.slo_ms,
            "slo_met": state.slo_met,
            "priority": p.priority,
            "degraded_from_steps": state.requested_steps,
            "lora": ({"adapters": [{"name": name, "scale": scale} for name, scale in p.lora],
                      "cache": state.adapter_cache,
                      "wait_ms": round(state.adapter_wait_s * 1000.0, 3) if state.adapter_wait_s is not None else None}
                     if p.lora else None),
            # which ControlNet served it (request name and model), at which scale; None without control
            "controlnet": ({"name": p.controlnet, "model": self.runner.spec.controlnets.get(p.controlnet),
                            "scale": round(p.controlnet_scale, 6)} if p.controlnet else None),  # FP32 on the wire
            "cascade": ({"light": cascade.light, "score": state.gate_score, "threshold": router.threshold,
                         "escalated": state.escalated, "escalation_skipped": state.escalation_skipped,
                         "gate_error": state.gate_error} if state.cascade else None),
            "timings_ms": {
                "front": round((t["queued"] - state.arrival) * 1000.0, 3) if "queued" in t else None,
                "queue": ms("queued", "encoding"),
                "encode": ms("encoding", "denoising"),
                "denoise": ms("denoising", "decoding"),
                "decode": ms("decoding", "finished"),
                "total": total,
                # what admission forecast for the total, to compare with it
                "predicted": (round((state.predicted_finish - state.arrival) * 1000.0, 3)
                              if state.predicted_finish is not None else None),
            },
        }


def make_engine(executor, spec: PipelineSpec, scheduler: StepScheduler | None = None, *, clock=time.monotonic,
                observer: Observer | None = None, device: str | None = None, pipelined: bool = True,
                **runner_options) -> Engine:
    """An engine over `executor` with a runner built for `scheduler` (tests, benchmarks, the simulator)."""
    scheduler = scheduler or StepScheduler()
    runner = Runner(executor, spec, device=device, pipelined=pipelined, clock=clock,
                    patch_grid=scheduler.patch_grid, **runner_options)
    return Engine(scheduler, runner, model=spec.model, clock=clock, observer=observer)
