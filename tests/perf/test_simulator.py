"""The scale-planning simulator on constructed profiles: exact queueing arithmetic, batching, capacity,
cascades, determinism, validation arithmetic and the CLI's one-line errors. No server, no GPU."""

import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from perf import simulator
from perf.simulator import (CascadeSpec, LatencyModel, RequestMix, SimRequest, Simulator, arrivals_from_intervals,
                            poisson_arrivals, read_intervals, scheduler_factory, simulate, validate)
from triffusion.orchestrator.cascade import LoadController, Option
from triffusion.orchestrator.policies import create_policy
from triffusion.orchestrator.scheduler import StepScheduler

REPO = Path(__file__).resolve().parents[2]

# Binary-exact times, so hand-computed finish times compare with ==.
ENCODE, STEP, DECODE = 0.0625, 0.125, 0.25


def flat_profile(models=("unet",), rows=range(1, 17), size=64):
    """UNet step time independent of rows (a GPU far from saturation), fixed encode and decode."""
    return {"unet": [[m, size, size, r, STEP] for m in models for r in rows],
            "stages": [["encode", 1, ENCODE], ["encode", 2, ENCODE], ["decode", size * size, DECODE]]}


def linear_profile(models=("unet",)):
    """A GPU that saturates: a step costs 10 ms plus 5 ms per UNet row."""
    return {"unet": [[m, 64, 64, r, 0.01 + 0.005 * r] for m in models for r in (1, 2, 4, 8, 16)],
            "stages": [["encode", 2, 0.005], ["decode", 64 * 64, 0.01]]}


def request(arrival, **kw):
    return SimRequest(arrival=arrival, **{"height": 64, "width": 64, "guidance_scale": 1.0, **kw})


def test_one_gpu_one_at_a_time_is_a_hand_computed_fcfs_queue():
    latency = LatencyModel(flat_profile())
    make = lambda: StepScheduler(max_active=1, max_batch=1, policy=create_policy("fcfs"))
    arrivals = [0.0, 0.25, 0.5, 3.0, 3.0625]
    result = simulate([request(t, steps=3) for t in arrivals], 1, make, latency)
    # One request at a time: encode, 3 steps, decode; the next one starts when the last one finished.
    service = ENCODE + 3 * STEP + DECODE  # 0.6875 s
    finish, expected = 0.0, []
    for t in arrivals:
        finish = max(finish, t) + service
        expected.append(finish)
    assert [r.finish for r in result.records] == expected
    assert [r.latency for r in result.records] == [f - t for f, t in zip(expected, arrivals)]
    assert all(r.model == "unet" and r.steps == 3 and r.rejected is None for r in result.records)
    s = result.summary
    assert s["attainment"] == 1.0 and s["mean_batch_rows"] == 1.0 and s["span_s"] == expected[-1]
    assert s["gpu_utilization"] == [pytest.approx(5 * service / expected[-1])]


def test_simultaneous_requests_share_every_unet_call_and_finish_together():
    latency = LatencyModel(flat_profile())
    make = lambda: StepScheduler(max_active=8, max_batch=16, policy=create_policy("fcfs"))
    result = simulate([request(0.0, steps=4) for _ in range(6)], 1, make, latency)
    # One encode of 6 rows, 4 shared steps, one decode of the six images (the VAE time scales with pixels).
    finish = ENCODE + 4 * STEP + 6 * DECODE
    assert [r.finish for r in result.records] == [finish] * 6
    assert result.summary["mean_batch_rows"] == 6.0
    one = simulate([request(0.0, steps=4)], 1, make, latency).records[0].finish
    assert finish < 6 * one  # batched, not serialised


def test_requests_of_two_resolutions_batch_per_bucket_and_decode_per_resolution():
    profile = flat_profile()
    profile["unet"] += [["unet", 128, 128, r, 2 * STEP] for r in range(1, 17)]
    profile["stages"].append(["decode", 128 * 128, 2 * DECODE])
    make = lambda: StepScheduler(max_active=8, policy=create_policy("fcfs"))
    result = simulate([request(0.0, steps=2), request(0.0, steps=2, height=128, width=128)], 1, make,
                      LatencyModel(profile))
    # The last iteration makes one VAE call per resolution (DECODE + 2 * DECODE; one call over both would
    # take decode(64² + 128²) = 2.5 * DECODE). Both answers leave when that iteration ends: the scheduler
    # finishes them in update_from_output, after the runner's whole iteration, as the server's Engine does
    # (the old simulator answered each resolution as soon as its own VAE call ended: 1.0625 s for the first).
    denoise = 2 * (STEP + 2 * STEP)  # two steps, each one call per bucket
    assert [r.finish for r in result.records] == [ENCODE + denoise + 3 * DECODE] * 2
    assert result.summary["mean_batch_rows"] == 1.0  # two buckets, two calls per step


def test_runs_of_identical_iterations_replay_exactly_as_iteration_by_iteration(monkeypatch):
    """The speed-up (one event per run of denoise-only iterations whose outputs the scheduler applies on
    arrival or at the run's end) changes nothing: not with noise, entropy stops, cascades or patches."""
    # Concave in rows, so a bucket split differently across calls would take a different time.
    profile = {"unet": [[m, s, s, r, f * (s / 64) ** 2 * (0.01 + 0.005 * r ** 0.7)]
                        for m, f in (("unet", 1.0), ("light", 0.6)) for s in (64, 128) for r in range(1, 17)],
               "stages": [["encode", 2, 0.005], ["decode", 64 * 64, 0.01]]}
    rng = random.Random(4)
    trace = [SimRequest(t, size, size, steps=rng.randint(3, 25), slo_ms=rng.choice([None, 1500, 4000]),
                        priority=rng.randint(0, 3), guidance_scale=rng.choice([1.0, 7.5]),
                        step_mode=rng.choice(["fixed", "auto"]))
             for t in poisson_arrivals(20, 30, seed=5) for size in [rng.choice([64, 128])]]
    light = [dataclasses.replace(r, model="light") for r in trace]
    # SRPT reorders a bucket mid-run: remaining work 12, 14, 16 (rows 1, 2, 1) becomes 9, 8, 13 after three
    # steps, and max_batch 2 then packs the three into two calls instead of three.
    flip = [SimRequest(0.0, 64, 64, steps=12, guidance_scale=1.0), SimRequest(0.0, 64, 64, steps=7),
            SimRequest(0.0, 64, 64, steps=16, guidance_scale=1.0)]
    cascade = CascadeSpec("light", "unet", escalation_rate=0.3, seed=2)
    cases = [(policy, trace, 6, 3, {}) for policy in ("fcfs", "srpt", "priority")] + [("srpt", flip, 2, 1, {})]
    cases += [("srpt", trace, 6, 3, {"noise": 0.2}), ("edf", light, 6, 3, {"noise": 0.1, "cascade": cascade}),
              ("fcfs", light, 6, 3, {"cascade": dataclasses.replace(cascade, heavy_gpus=1)}),
              ("priority", trace, 6, 2, {"noise": 0.1, "hybrid": "patch"})]
    # A load controller re-decides every 2 s at a schedule() (escalation then follows its operating point).
    points = [Option(0.3, 20, 0.1, 0.9, 0.1, 0.3), Option(0.5, 10, 0.3, 0.8, 0.05, 0.15)]
    controller = lambda: LoadController(points, interval_s=2.0)
    cases.append(("edf", light, 6, 3, {"cascade": cascade, "controller": controller}))
    for policy, requests, max_batch, gpus, extra in cases:
        options = {k: v for k, v in extra.items() if k in ("cascade",)}
        make = scheduler_factory(profile, policy, max_active=8, max_queue=32, max_batch=max_batch,
                                 **{k: v for k, v in extra.items() if k in ("hybrid", "controller")})
        replay = lambda: simulate(requests, gpus, make, LatencyModel(profile, noise=extra.get("noise", 0.0), seed=7),
                                  auto_steps=lambda n: max(1, n // 2), **options)
        fast = replay()
        with monkeypatch.context() as patch:
            patch.setattr(simulator._Replay, "_repeats", lambda self, gpu, plan: 1)
            slow = replay()
        assert fast.records == slow.records
        assert fast.summary == slow.summary
        if requests is not flip:
            assert 0.3 < fast.summary["attainment"] < 0.99 and fast.summary["rejected"]  # a loaded case
        if "cascade" in extra:  # 0.3 drawn; an escalation that cannot meet its deadline is skipped (in place)
            assert 0.1 < fast.summary["escalation_rate"] < 0.4
        if "controller" in extra:
            assert fast.summary["escalation_rate"] != simulate(requests, gpus, scheduler_factory(
                profile, policy, max_active=8, max_queue=32, max_batch=max_batch), LatencyModel(profile),
                auto_steps=lambda n: max(1, n // 2), cascade=cascade).summary["escalation_rate"]


def test_a_controller_restored_mid_run_is_in_force_from_the_first_request():
    """The SLO proof starts each point's simulated controller where the server's stands (its profile's
    `controller`): its operating point is in force before it decides, and a window the pause between points
    left open is decided at the first schedule, the demand it counted blended in as the server's is."""
    from triffusion.orchestrator.scheduler import Cascade

    points = [Option(0.3, 20, 0.1, 0.9, 0.1, 0.3), Option(0.5, 10, 0.3, 0.8, 0.05, 0.15)]
    state = {"demand": 9.0, "arrivals": 3, "window_age_s": 30.0, "option": dataclasses.asdict(points[1]),
             "light_gpus": 1, "heavy_gpus": 0}

    def controller():
        made = LoadController(points, interval_s=2.0, alpha=0.5)
        made.restore(state, now=0.0)
        return made

    scheduler = scheduler_factory(linear_profile(("light", "unet")), "edf", controller=controller)(
        cascade=Cascade("light", "unet"))
    assert (scheduler.router.threshold, scheduler.step_budget) == (0.5, 10)
    plan = scheduler.schedule(0.0)
    assert plan.decision is not None and scheduler.controller.demand == pytest.approx(0.5 * 9.0 + 0.5 * 3 / 30.0)
    fresh = scheduler_factory(linear_profile(("light", "unet")), "edf",
                              controller=lambda: LoadController(points, interval_s=2.0))(cascade=Cascade("light", "unet"))
    assert fresh.step_budget is None and fresh.schedule(0.0).decision is None  # no request yet: no window


def test_the_simulator_keeps_no_copy_of_engine_semantics():
    """Issue 11: request state changes only in the scheduler (update_from_output); perf/ only reads it."""
    for path in sorted((REPO / "perf").glob("*.py")):
        source = path.read_text()
        state = r"\.(steps_done|steps_target|status|last_step_pending|early_stop|escalated|stopper)\s*[-+]?=(?!=)"
        for pattern in (state, r"\.release\(", r"\.enter\(", r"\.route\(", r"\._escalate\("):
            hits = [line for line in source.splitlines() if re.search(pattern, line) and "record." not in line]
            assert not hits, f"{path.name}: {hits}"


def poisson_trace(rate, duration, seed=1, slo_ms=2000, steps=20):
    return RequestMix(sizes=(64,), steps=steps, slo_ms=slo_ms).requests(poisson_arrivals(rate, duration, seed), seed)


def test_more_gpus_never_lower_attainment_on_the_same_trace():
    profile = linear_profile()
    make = scheduler_factory(profile, "edf", max_active=8, max_queue=16)
    trace = poisson_trace(rate=12.0, duration=60)
    attainment = [simulate(trace, gpus, make, LatencyModel(profile)).summary["attainment"] for gpus in (1, 2, 4)]
    assert attainment[0] <= attainment[1] <= attainment[2]
    assert attainment[0] < 0.9 and attainment[2] > 0.99


def test_attainment_drops_past_capacity():
    # Capacity: 8 active x 2 rows = one 0.09 s step for 8 requests, 20 steps -> about 4 requests/s.
    profile = linear_profile()
    make = scheduler_factory(profile, "edf", max_active=8, max_queue=64)
    light = simulate(poisson_trace(rate=1.0, duration=120), 1, make, LatencyModel(profile)).summary
    heavy = simulate(poisson_trace(rate=12.0, duration=120), 1, make, LatencyModel(profile)).summary
    assert light["attainment"] >= 0.99 and not light["rejected"]
    assert heavy["attainment"] < 0.9
    # Rejections are counted by the ServingError's own reason tag ("slo" was "rejected" before the errors had one).
    assert heavy["rejected"] and set(heavy["rejected"]) <= {"queue_full", "slo"}
    assert heavy["mean_batch_rows"] > light["mean_batch_rows"]  # a busy GPU batches more
    assert heavy["mean_gpu_utilization"] > 0.95 > light["mean_gpu_utilization"]
    assert sum(heavy["rejected"].values()) + heavy["finished"] == heavy["requests"]


def test_cascade_escalates_at_the_set_rate_and_answers_name_their_model():
    profile = linear_profile(models=("light", "heavy"))
    make = scheduler_factory(profile, "edf", max_active=8, max_queue=10_000)
    mix = RequestMix(sizes=(64,), steps=10, slo_ms=None, model="light")
    trace = mix.requests(poisson_arrivals(2.0, 1000, seed=3), seed=3)
    cascade = CascadeSpec("light", "heavy", escalation_rate=0.3, seed=5, heavy_gpus=1)
    result = Simulator(3, make, LatencyModel(profile), cascade=cascade).run(trace)
    assert len(trace) > 1500
    assert result.summary["escalation_rate"] == pytest.approx(0.3, abs=0.05)
    escalated = [r for r in result.records if r.escalated]
    assert {r.model for r in escalated} == {"heavy"}
    assert {r.model for r in result.records if not r.escalated} == {"light"}
    assert {r.gpu for r in escalated} == {2} and {r.gpu for r in result.records if not r.escalated} == {0, 1}
    # Latency counts from the first arrival: an escalated answer took both runs.
    alone = simulate([SimRequest(0.0, 64, 64, steps=10, model="heavy")], 1, make, LatencyModel(profile))
    assert min(r.latency for r in escalated) > alone.records[0].latency
    counts = result.summary["answers_by_model"]
    assert counts == {"heavy": len(escalated), "light": len(trace) - len(escalated)}


def test_a_requests_own_escalate_flag_overrides_the_rate():
    profile = linear_profile(models=("light", "heavy"))
    make = scheduler_factory(profile, "fcfs")
    trace = [SimRequest(i * 5.0, 64, 64, steps=4, model="light", escalate=(i % 2 == 0)) for i in range(6)]
    result = Simulator(1, make, LatencyModel(profile), cascade=CascadeSpec("light", "heavy", 0.0)).run(trace)
    assert [r.model for r in result.records] == ["heavy", "light"] * 3
    assert result.summary["escalation_rate"] == 0.5
    # The heavy run keeps the first deadline: 95 ms on the light model (5 + 4 x 20 + 10 ms) and 90 ms more on
    # the heavy one would miss a 150 ms SLO. The scheduler escalates in place, as the server does, and only
    # when the heavy redo can still meet the deadline: here it cannot, so the light answers stand, on time.
    tight = [SimRequest(i * 5.0, 64, 64, steps=4, model="light", slo_ms=150, escalate=(i % 2 == 0)) for i in range(4)]
    result = Simulator(1, make, LatencyModel(profile), cascade=CascadeSpec("light", "heavy", 0.0)).run(tight)
    assert [r.rejected for r in result.records] == [None] * 4
    assert [r.model for r in result.records] == ["light"] * 4
    assert [r.latency for r in result.records] == pytest.approx([0.095] * 4)
    assert result.summary["attainment"] == 1.0 and result.summary["rejected"] == {}
    # With 300 ms the redo fits (95 + 90 ms, within the SLO less the default 20% admission headroom, and the
    # forecast bias learned from the escalated ones): they finish on the heavy model, in time.
    roomy = [dataclasses.replace(r, slo_ms=300) for r in tight]
    result = Simulator(1, make, LatencyModel(profile), cascade=CascadeSpec("light", "heavy", 0.0)).run(roomy)
    assert [r.model for r in result.records] == ["heavy", "light"] * 2
    assert [r.latency for r in result.records] == pytest.approx([0.185, 0.095] * 2)


def test_early_stop_runs_fewer_steps():
    latency = LatencyModel(flat_profile())
    make = lambda: StepScheduler(max_active=1, policy=create_policy("fcfs"))
    # The scheduler's own EntropyStop decides: the simulated entropy is flat from steps_run on, the stop
    # needs min_fraction of the steps done, then one last evaluation. Only step_mode "auto" has a stop (a
    # fixed request with steps_run is refused); min_fraction 0.3 lets 10 steps stop after 3 + 1 = 4.
    loose = lambda: StepScheduler(max_active=1, policy=create_policy("fcfs"), entropy={"unet": {"min_fraction": 0.3}})
    explicit = simulate([request(0.0, steps=10, steps_run=4, step_mode="auto")], 1, loose, latency).records[0]
    assert (explicit.steps, explicit.finish) == (4, ENCODE + 4 * STEP + DECODE)
    auto = Simulator(1, make, latency, auto_steps=lambda steps: steps // 2)
    result = auto.run([request(0.0, steps=10, step_mode="auto"), request(0.0, steps=10)])
    assert [r.steps for r in result.records] == [5, 10]  # only step_mode "auto" stops early
    # Settled sooner than the default thresholds allow (min_fraction 0.4): the stop comes after 4 steps + 1.
    early = simulate([request(0.0, steps=10, steps_run=2, step_mode="auto")], 1, make, latency).records[0]
    assert (early.steps, early.finish) == (5, ENCODE + 5 * STEP + DECODE)
    with pytest.raises(ValueError, match="steps_run: 4 needs step_mode 'auto'"):
        request(0.0, steps=10, steps_run=4)


def test_same_seed_same_replay_and_noise_changes_it():
    profile = linear_profile()
    make = scheduler_factory(profile, "edf", max_active=8, max_queue=16)
    trace = poisson_trace(rate=6.0, duration=30)
    run = lambda seed: [(r.finish, r.rejected, r.gpu) for r in
                        simulate(trace, 2, make, LatencyModel(profile, noise=0.2, seed=seed)).records]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_round_robin_alternates_and_least_loaded_spreads():
    latency = LatencyModel(flat_profile())
    make = lambda: StepScheduler(max_active=1)
    trace = [request(0.0, steps=2) for _ in range(4)] + [request(10.0, steps=2) for _ in range(2)]
    robin = simulate(trace, 3, make, latency, dispatch="round_robin")
    assert [r.gpu for r in robin.records] == [0, 1, 2, 0, 1, 2]
    least = simulate(trace, 3, make, latency)
    assert [r.gpu for r in least.records] == [0, 1, 2, 0, 0, 1]


def test_validate_gives_relative_errors_per_rate():
    simulated = {"rates": {"1": {"attainment": 0.9, "throughput_rps": 2.0},
                           "2": {"attainment": 0.5, "throughput_rps": 3.0}}}
    measured = {"rates": {"1.0": {"attainment": 1.0, "throughput_rps": 2.5},
                          "4": {"attainment": 0.1, "throughput_rps": 3.0}}}
    report = validate(simulated, measured)
    assert report["rates"]["1"]["attainment"] == {"simulated": 0.9, "measured": 1.0,
                                                   "rel_error": pytest.approx(0.1)}
    assert report["rates"]["1"]["throughput_rps"]["rel_error"] == pytest.approx(0.2)
    assert report["max_rel_error"] == {"attainment": pytest.approx(0.1), "throughput_rps": pytest.approx(0.2)}
    assert (report["simulated_only"], report["measured_only"]) == (["2"], ["4"])
    with pytest.raises(ValueError, match=r"measured.rates.1.throughput_rps: missing"):
        validate(simulated, {"rates": {"1": {"attainment": 1.0}}})


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"profile.unet\[0\]"):
        LatencyModel({"unet": [["unet", 64, 64, 1]], "stages": []})
    with pytest.raises(ValueError, match="profile.stages: no 'decode' entry"):
        LatencyModel({"unet": [["unet", 64, 64, 1, 0.1]], "stages": [["encode", 2, 0.01]]})
    with pytest.raises(ValueError, match="steps: 0 is not allowed"):
        SimRequest(0.0, steps=0)
    latency = LatencyModel(flat_profile())
    with pytest.raises(ValueError, match="request 1: model 'sdxl' is not in the latency profile; profiled: unet"):
        simulate([request(0.0), request(1.0, model="sdxl")], 1, StepScheduler, latency)
    with pytest.raises(ValueError, match="request 0: unknown field"):
        simulate([{"arrival": 0.0, "hieght": 64}], 1, StepScheduler, latency)
    shared = StepScheduler()
    with pytest.raises(ValueError, match="same scheduler twice"):
        simulate([request(0.0)], 2, lambda: shared, latency)


def test_request_intervals_are_read_in_microseconds_and_rescaled(tmp_path):
    path = tmp_path / "intervals.txt"
    path.write_text("1000000\n\n500000\n")
    intervals = read_intervals(path)
    assert intervals == [1.0, 0.5]
    assert arrivals_from_intervals(intervals) == [1.0, 1.5]
    # Mean interval 0.75 s -> at 4/s every interval shrinks 3x; repeated to fill 1.2 s.
    assert arrivals_from_intervals(intervals, rate=4.0, duration=1.2) == pytest.approx([1 / 3, 0.5, 5 / 6, 1.0])
    path.write_text("1000\nsoon\n")
    with pytest.raises(ValueError, match=r"line 2: 'soon' is not an interval in microseconds"):
        read_intervals(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "perf.simulator", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_files_are_one_error_line(tmp_path):
    missing = run_cli("--profile", tmp_path / "nope.json", "--rates", "1")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [f"error: profile {tmp_path / 'nope.json'}: cannot read "
                                                   "(No such file or directory)"]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(linear_profile()))
    bad = tmp_path / "intervals.txt"
    bad.write_text("-5\n")
    wrong = run_cli("--profile", profile, "--request-intervals", bad)
    assert wrong.returncode != 0 and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith(f"error: request intervals {bad} line 1: '-5'")


def test_cli_sweeps_gpus_and_rates_and_validates(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(linear_profile()))
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"rates": {"1": {"attainment": 1.0, "throughput_rps": 1.0},
                                              "12": {"attainment": 0.5, "throughput_rps": 4.0}}}))
    out = tmp_path / "result.json"
    done = run_cli("--profile", profile, "--gpus", "1,2", "--duration", "60", "--steps", "20", "--sizes", "64",
                   "--slo-ms", "2000", "--policy", "edf", "--validate", measured, "--out", out)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"1", "2"} and set(report["results"]["1"]["rates"]) == {"1", "12"}
    one = report["results"]["1"]["rates"]
    assert one["1"]["attainment"] > one["12"]["attainment"]
    # Per-GPU rates: two GPUs see twice the requests of one.
    two = report["results"]["2"]["rates"]
    assert two["12"]["requests"] > 1.5 * one["12"]["requests"]
    row = report["validation"]["rates"]["12"]["attainment"]
    assert row["rel_error"] == pytest.approx(abs(one["12"]["attainment"] - 0.5) / 0.5)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_side_stages_beside_unet_calls_add_the_profiles_share_of_the_shorter(share):
    """side_share 0: an iteration with a side stage lasts the longer of it and the UNet calls (a GPU host);
    1: their sum (a CPU host whose cores both share). Hand-computed timeline, max_active 2."""
    make = lambda: StepScheduler(max_active=2, policy=create_policy("fcfs"))
    result = simulate([request(0.0, steps=3), request(0.1, steps=3)], 1, make,
                      LatencyModel({**flat_profile(), "side_share": share}))
    # first: its encode alone, a step, a step beside second's encode, a step with second, then its decode
    # beside second's second step; second: its last step, then its decode alone.
    first = ENCODE + STEP + (STEP + share * ENCODE) + STEP + (DECODE + share * STEP)
    assert [r.finish for r in result.records] == [first, first + STEP + DECODE]


def test_served_profile_scales_what_the_server_never_timed_by_what_serving_cost_on_what_it_did():
    exported = {"unet": [["unet", 64, 64, r, 0.01 * r] for r in (1, 2, 4, 8)],
                "stages": [["encode", 2, 0.002], ["decode", 4096, 0.004], ["decode", 16384, 0.016]]}
    learned = {"unet": [["unet", 64, 64, 1, 0.02], ["unet", 64, 64, 2, 0.08], ["unet", 64, 64, 4, 0.04],
                        ["unet", 64, 64, 8, 0.08]],  # rows 1 and 2 timed (x2, x4), 4 and 8 still the export's
               "stages": [["encode", 2, 0.002], ["decode", 4096, 0.012], ["decode", 16384, 0.016]],
               "iteration_scale": 1.5, "side_share": 0.25, "forecast_bias": {"interactive": 1.1},
               "stop_fraction": {"unet/interactive": 0.7}}
    profile, scales = simulator.served_profile(exported, learned)
    assert scales == {"unet": pytest.approx(8 ** 0.5, abs=1e-4), "stages": 3.0}  # reported to 4 places
    unet = {row[3]: row[4] for row in profile["unet"]}
    assert unet[1] == pytest.approx(0.02 * 1.5) and unet[2] == pytest.approx(0.08 * 1.5)  # timed: as learned
    assert unet[4] == pytest.approx(0.04 * 8 ** 0.5 * 1.5) and unet[8] == pytest.approx(0.08 * 8 ** 0.5 * 1.5)
    stages = {tuple(row[:2]): row[2] for row in profile["stages"]}
    assert stages[("decode", 4096)] == 0.012 and stages[("encode", 2)] == pytest.approx(0.006)
    assert profile["side_share"] == 0.25 and profile["forecast_bias"] == {"interactive": 1.1}
    # the scheduler a simulator makes from it starts where the server's was
    scheduler = simulator.scheduler_factory(profile)()
    assert scheduler.side_share == 0.25 and scheduler.forecast_bias == {"interactive": 1.1}
    assert scheduler.stop_fraction == {("unet", "interactive"): 0.7}
    assert LatencyModel(profile).side_share == 0.25
    with pytest.raises(ValueError, match=r"profile.side_share: 1.5 is not allowed; allowed a number from 0 to 1"):
        LatencyModel({**profile, "side_share": 1.5})
