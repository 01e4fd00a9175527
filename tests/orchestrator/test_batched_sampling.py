"""The batched step (one set of tensor ops for all requests of a UNet batch that share a step rule) gives
the latents of today's per-request diffusers path, on torch CPU tensors: the same code the GPU runs."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triffusion.orchestrator.engine import PipelineSpec, make_engine
from triffusion.orchestrator.params import SCHEDULERS, GenerationParams
from triffusion.orchestrator.sampling import BatchedStep, Sampler
from triffusion.orchestrator.scheduler import StepScheduler

from .fakes import SCHEDULER_CONFIG, FakeExecutor, LatentRecorder, TorchFakeExecutor, make_state

BATCHED = ("euler", "euler_a", "ddim", "dpmpp_2m")
LATENT = (4, 8, 8)  # a 64x64 image
TOLERANCE = 1e-5


def fake_unet(sample: torch.Tensor, timestep: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """Each row's output depends on its own input only; the conditioning differs between uncond and cond rows."""
    return torch.from_numpy(FakeExecutor().denoise("unet", sample.numpy(), timestep.numpy(), conditioning.numpy()))


def conditioning(samplers, rows_of) -> torch.Tensor:
    """(rows, 77, 4) embeddings whose mean differs per request and between uncond and cond."""
    values = [0.03 * (k + 1) * (-1) ** r for k in rows_of for r in range(2 if samplers[k].cfg else 1)]
    return torch.tensor(values, dtype=torch.float32)[:, None, None].expand(-1, 77, 4).contiguous()


def make_samplers(scheduler: str, guidances, steps: int = 20, config=None) -> list[Sampler]:
    return [Sampler(GenerationParams(prompt="p", steps=steps, guidance_scale=g, seed=10 + k, scheduler=scheduler),
                    config or SCHEDULER_CONFIG, LATENT) for k, g in enumerate(guidances)]


def run(samplers, schedule, batched: bool) -> None:
    """`schedule`: per iteration, the (request, evaluation index, last step?) of one UNet batch."""
    for batch in schedule:
        if batched:  # one BatchedStep per (guidance mode, step kind), as the runner groups them
            groups: dict = {}
            for k, index, last in batch:
                groups.setdefault((samplers[k].batch_key, last), []).append((k, index))
            for (_, last), members in groups.items():
                stepper = BatchedStep([samplers[k] for k, _ in members], [i for _, i in members])
                sample, t = stepper.model_input()
                stepper.step(fake_unet(sample, t, conditioning(samplers, [k for k, _ in members])), last=last)
        else:
            for k, index, last in batch:
                sample, t = samplers[k].model_input(index)
                noise = fake_unet(sample, t, conditioning(samplers, [k]))
                (samplers[k].last_step if last else samplers[k].step)(index, noise)


def staggered(starts, steps=20, last_at=None):
    """Request k joins at iteration starts[k] and runs its evaluations; with last_at[k], it takes its last
    step (straight to x0) at that evaluation and leaves."""
    last_at = last_at or {}
    schedule = []
    for it in range(max(starts) + steps):
        batch = []
        for k, start in enumerate(starts):
            index = it - start
            end = last_at.get(k, steps - 1)
            if 0 <= index <= end:
                batch.append((k, index, k in last_at and index == end))
        if batch:
            schedule.append(batch)
    return schedule


def max_diff(a, b) -> float:
    return max(float((x.latents - y.latents).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("scheduler", BATCHED)
@pytest.mark.parametrize("guidances", [(7.5, 7.5, 7.5), (1.0, 1.0, 1.0), (7.5, 1.0, 4.0)],
                         ids=["cfg", "no-cfg", "mixed"])
def test_batched_step_matches_diffusers_over_20_steps(scheduler, guidances):
    """Three requests at different evaluations in every batch (they joined 0, 3 and 7 iterations apart)."""
    schedule = staggered([0, 3, 7])
    reference, batched = make_samplers(scheduler, guidances), make_samplers(scheduler, guidances)
    run(reference, schedule, batched=False)
    run(batched, schedule, batched=True)
    assert max_diff(reference, batched) < TOLERANCE
    assert all(float(s.latents.abs().max()) > 0.1 for s in batched)  # not trivially equal


@pytest.mark.parametrize("scheduler", BATCHED)
def test_last_step_matches_in_a_batch_with_stepping_requests(scheduler):
    """Request 1 jumps to x0 at evaluation 9 while its neighbours take ordinary steps in the same UNet batch."""
    schedule = staggered([0, 2, 5], last_at={1: 9})
    guidances = (7.5, 7.5, 3.0)
    reference, batched = make_samplers(scheduler, guidances), make_samplers(scheduler, guidances)
    run(reference, schedule, batched=False)
    run(batched, schedule, batched=True)
    assert max_diff(reference, batched) < TOLERANCE


@pytest.mark.parametrize("scheduler, overrides", [
    ("euler", {"prediction_type": "v_prediction"}), ("euler", {"prediction_type": "sample"}),
    ("euler", {"use_karras_sigmas": True}), ("euler_a", {"prediction_type": "v_prediction"}),
    ("ddim", {"prediction_type": "v_prediction"}), ("ddim", {"prediction_type": "sample"}),
    ("ddim", {"clip_sample": True, "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {"prediction_type": "v_prediction"}), ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"use_karras_sigmas": True, "lower_order_final": False}), ("dpmpp_2m", {"solver_order": 1}),
], ids=str)
def test_batched_step_matches_diffusers_for_other_configs(scheduler, overrides):
    config = {**SCHEDULER_CONFIG, **overrides}
    schedule = staggered([0, 3, 7], steps=12, last_at={2: 8})
    reference = make_samplers(scheduler, (7.5, 1.0, 7.5), steps=12, config=config)
    batched = make_samplers(scheduler, (7.5, 1.0, 7.5), steps=12, config=config)
    assert batched[0].rule is not None
    run(reference, schedule, batched=False)
    run(batched, schedule, batched=True)
    assert max_diff(reference, batched) < TOLERANCE


def test_euler_a_noise_is_per_request_seeded_and_identical():
    """Two requests with the same seed get the same image alone or beside others; different seeds differ."""
    a = make_samplers("euler_a", (7.5, 7.5, 7.5))
    b = make_samplers("euler_a", (7.5,))
    run(a, staggered([0, 1, 4]), batched=True)
    run(b, staggered([0]), batched=True)
    assert torch.equal(a[0].latents, b[0].latents)
    assert float((a[0].latents - a[1].latents).abs().max()) > 0.1


def test_only_table_schedulers_are_batched_and_unsupported_configs_step_alone():
    assert {s for s in SCHEDULERS if make_samplers(s, (7.5,))[0].rule is not None} == set(BATCHED)
    thresholded = Sampler(GenerationParams(prompt="p", scheduler="ddim"), {**SCHEDULER_CONFIG, "thresholding": True},
                          LATENT)
    third_order = Sampler(GenerationParams(prompt="p", scheduler="dpmpp_2m"), {**SCHEDULER_CONFIG, "solver_order": 3},
                          LATENT)
    assert thresholded.rule is None and thresholded.batch_key is None and third_order.rule is None


class OpCounter(TorchDispatchMode):
    """The aten ops a block dispatches, views apart (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", BATCHED)
def test_one_set_of_ops_per_batch_and_no_host_read(scheduler):
    """The ops of one batched step do not grow with the number of requests, and none reads a number back
    to the host (`.item()`, `float()`, `.cpu()`), so the GPU path needs no sync to step."""

    def count(n):
        samplers = make_samplers(scheduler, (7.5,) * n)
        for k, s in enumerate(samplers):  # requests at different evaluations, with a history for dpmpp_2m
            s.previous = s.latents.clone() if k % 2 else None
        noise_pred, counter = torch.ones(2 * n, *LATENT), OpCounter()
        with counter:
            stepper = BatchedStep(samplers, [k % 5 + 1 for k in range(n)])
            stepper.model_input()
            stepper.step(noise_pred)
        return counter.ops

    small, large = count(2), count(8)
    assert small == large
    assert not {"_local_scalar_dense", "item", "_to_copy"} & set(large)


# ---- through the runner -------------------------------------------------------------------------
def serve(executor, batched: bool, device=None):
    """Requests of every scheduler, with and without CFG, joining at different iterations, one of them
    stopping early (its last step goes straight to x0) — all in shared UNet batches."""
    engine = make_engine(executor, PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG),
                         StepScheduler(max_active=16, max_batch=32,
                                       entropy={"unet": {"threshold": 10.0, "patience": 1, "min_fraction": 0.3}}),
                         device=device, pipelined=False, batched_sampling=batched)
    states = []
    for k, scheduler in enumerate(sorted(SCHEDULERS) + list(BATCHED)):
        state = make_state(k, steps=20, guidance=1.0 if k % 3 == 0 else 7.5)
        state.params.scheduler = scheduler
        if k == 2:
            state.params.step_mode = "auto"
        states.append(state)
    for wave in (states[:4], states[4:8], states[8:]):
        for state in wave:
            engine.submit(state)
        for _ in range(3):
            engine.step()
    while engine.scheduler.has_work:
        engine.step()
    engine.runner.close()
    return states


def test_runner_batched_path_matches_per_request_path():
    alone, together = LatentRecorder(), LatentRecorder()
    reference, batched = serve(alone, batched=False), serve(together, batched=True)
    assert [s.sink.outcome for s in batched] == ["finish"] * len(batched)
    assert batched[2].sink.events[-1][2]["early_stop"]  # the auto request took its last step
    assert [len(x) for x in alone.decoded] == [len(x) for x in together.decoded]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(alone.decoded, together.decoded))
    assert worst < TOLERANCE
    for r, b in zip(reference, batched):
        assert np.array_equal(r.sink.events[-1][1], b.sink.events[-1][1])
    # A UNet batch held requests of several schedulers at different steps.
    assert max(rows for name, rows in together.calls if name == "denoise") > 8


def test_numpy_executor_and_torch_executor_run_the_same_stepping_code():
    """device=None: CPU torch tensors with numpy only at the executor call; device="cpu": torch all the way."""
    numpy_side, torch_side = LatentRecorder(), TorchFakeExecutor()
    serve(numpy_side, batched=True)
    serve(torch_side, batched=True, device="cpu")
    assert [len(x) for x in numpy_side.decoded] == [len(x) for x in torch_side.decoded]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(numpy_side.decoded, torch_side.decoded))
    assert worst < 1e-4  # numpy and torch reduce the fake embeddings' mean in different orders


def test_runner_keeps_torch_tensors_on_its_device_and_numpy_at_the_executor_only():
    from triffusion.orchestrator.runner import Runner

    spec = PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG)
    numpy_runner, torch_runner = Runner(FakeExecutor(), spec), Runner(TorchFakeExecutor(), spec, device="cpu")
    assert numpy_runner.device == torch_runner.device == torch.device("cpu")
    assert not numpy_runner.torch_executor and torch_runner.torch_executor
    numpy_runner.close()
    torch_runner.close()


# ---- micro-benchmark: python -m tests.orchestrator.test_batched_sampling ----------------------------
class EchoUNet(TorchFakeExecutor):
    """A UNet that costs nothing: the runner's stepping is all that is timed."""

    def denoise(self, model, sample, timestep, text_embeddings):
        return sample


def stepping_ms(scheduler: str, requests: int, batched: bool, size: int, iterations: int = 20) -> float:
    """Milliseconds per iteration of the runner's stepping (rows, guidance, step) for `requests` CFG
    requests of one scheduler at different evaluations, on the CPU."""
    import time

    from triffusion.orchestrator.runner import Runner
    from triffusion.orchestrator.scheduler import Plan, RunnerOutput

    runner = Runner(EchoUNet(), PipelineSpec(model="fake", scheduler_config=SCHEDULER_CONFIG), device="cpu",
                    pipelined=False, batched_sampling=batched)
    states = [make_state(k, size=size, steps=100) for k in range(requests)]
    for state in states:
        state.params.scheduler = scheduler
    runner.execute(Plan(encode=states))
    elapsed = []
    for it in range(iterations + 3):
        for k, state in enumerate(states):
            state.steps_done = k % 10 + it
        start = time.perf_counter()
        runner._denoise(states, RunnerOutput(), patched=False)
        elapsed.append(time.perf_counter() - start)
    runner.close()
    return 1000 * sum(elapsed[3:]) / iterations


if __name__ == "__main__":
    torch.set_num_threads(1)
    for size in (64, 512):
        print(f"image {size}x{size} (latent {size // 8}x{size // 8}), CFG, ms per iteration, UNet excluded")
        print(f"{'scheduler':<10}{'requests':>9}{'per-request':>13}{'batched':>9}{'speedup':>9}")
        for scheduler in BATCHED:
            for n in (8, 16):
                alone, together = stepping_ms(scheduler, n, False, size), stepping_ms(scheduler, n, True, size)
                print(f"{scheduler:<10}{n:>9}{alone:>13.2f}{together:>9.2f}{alone / together:>8.1f}x")
