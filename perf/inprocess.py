"""The orchestrator's engine serving requests in this process (no server): the sink that keeps each answer, and
the loop that steps the engine until every request has one. The perf tools that compare served images with a
reference (perf.addons, perf.addons_controlnet) use it."""

from __future__ import annotations

import time
from pathlib import Path


class Collect:
    """A sink that keeps the answer (image and metadata, or the error) and when it came."""

    def __init__(self, on_done=None):
        self.image = self.metadata = self.error = None
        self.on_done = on_done
        self.done_at = None

    def progress(self, step, steps): ...
    def preview(self, image): ...

    def finish(self, image, metadata):
        self.image, self.metadata, self.done_at = image, metadata, time.monotonic()
        if self.on_done:
            self.on_done(self)

    def fail(self, error):
        self.error, self.done_at = error, time.monotonic()
        if self.on_done:
            self.on_done(self)


def drain(engine, states, submit=None) -> None:
    """Submit `states` (through `submit`, default `engine.submit`), step the engine until it has no work left,
    and close its runner."""
    for state in states:
        (submit or engine.submit)(state)
    while engine.scheduler.has_work:
        engine.step()
    engine.runner.close()


def serve_fields(engine, limits, repo: Path, requests: list[dict], prefix: str = "r") -> list[tuple]:
    """Requests as a client sends their fields, validated against `limits` and tokenized with the repository's
    tokenizer, served together; (image, metadata) each, in order. A failed request raises."""
    from triffusion.orchestrator.params import parse_params
    from triffusion.orchestrator.request import RequestState
    from triffusion.orchestrator.text import PromptTokenizer

    tokenizer = PromptTokenizer(Path(repo) / "orchestrator" / "1" / "tokenizer")
    states = []
    for i, raw in enumerate(requests):
        params = parse_params(raw, limits, tokenizer.count)
        ids = tokenizer.input_ids(params.prompt, params.negative_prompt, cfg=params.uses_cfg)
        states.append(RequestState(f"{prefix}-{i}", params, Collect(), ids))
    drain(engine, states)
    for state in states:
        if state.sink.error is not None:
            error = state.sink.error
            raise RuntimeError(f"request failed: {getattr(error, 'message', error)}")
    return [(s.sink.image, s.sink.metadata) for s in states]
