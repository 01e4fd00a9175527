"""Rows per UNet call in the benchmarks come from /metrics (two scrapes around a burst), never from the run's
intent: metrics_text's helpers, orchestration_overhead's rows fields and unet_serving's rows_observed on
fixture scrapes in the format tritonserver serves."""

from perf import metrics_text
from perf.orchestration_overhead import rows_fields
from perf.unet_serving import rows_observed

BEFORE = """\
# HELP triffusion_unet_batch_rows UNet rows per GPU call
# TYPE triffusion_unet_batch_rows histogram
triffusion_unet_batch_rows_count 6
triffusion_unet_batch_rows_sum 40
triffusion_unet_batch_rows_bucket{le="8"} 6
triffusion_unet_batch_rows_bucket{le="+Inf"} 6
# HELP triffusion_unet_call_seconds Time per UNet call, by rows in the call
# TYPE triffusion_unet_call_seconds histogram
triffusion_unet_call_seconds_count{rows="6"} 1
triffusion_unet_call_seconds_sum{rows="6"} 0.0134
triffusion_unet_call_seconds_bucket{rows="6",le="0.025"} 1
triffusion_unet_call_seconds_count{rows="8"} 4
triffusion_unet_call_seconds_sum{rows="8"} 0.0366
triffusion_unet_call_seconds_bucket{rows="8",le="0.025"} 4
triffusion_unet_call_seconds_count{rows="2"} 1
triffusion_unet_call_seconds_sum{rows="2"} 0.0359
triffusion_unet_call_seconds_bucket{rows="2",le="0.05"} 1
triffusion_stage_seconds_count{stage="unet"} 6
triffusion_stage_seconds_sum{stage="unet"} 0.086
"""

# The burst: 10 calls carrying 74 rows: 8 of 8 rows, one more of 6, one of 4 (a label new since BEFORE);
# rows="2" gained nothing.
AFTER = """\
triffusion_unet_batch_rows_count 16
triffusion_unet_batch_rows_sum 114
triffusion_unet_batch_rows_bucket{le="8"} 16
triffusion_unet_call_seconds_count{rows="6"} 2
triffusion_unet_call_seconds_sum{rows="6"} 0.0268
triffusion_unet_call_seconds_count{rows="8"} 12
triffusion_unet_call_seconds_sum{rows="8"} 0.1166
triffusion_unet_call_seconds_bucket{rows="8",le="0.025"} 12
triffusion_unet_call_seconds_count{rows="2"} 1
triffusion_unet_call_seconds_sum{rows="2"} 0.0359
triffusion_unet_call_seconds_count{rows="4"} 1
triffusion_unet_call_seconds_sum{rows="4"} 0.009
triffusion_stage_seconds_count{stage="unet"} 16
triffusion_stage_seconds_sum{stage="unet"} 0.2
"""


def scrapes():
    return metrics_text.parse(BEFORE), metrics_text.parse(AFTER)


def test_unet_rows_between_reads_the_rows_histograms():
    before, after = scrapes()
    seen = metrics_text.unet_rows_between(before, after)
    assert seen == {"unet_calls": 10, "rows_per_call": 7.4, "calls_by_rows": {"4": 1, "6": 1, "8": 8}}
    assert list(seen["calls_by_rows"]) == ["4", "6", "8"]  # numeric order, only labels that gained calls
    assert metrics_text.delta(before, after, "triffusion_stage_seconds_count", stage="unet") == 10
    call = metrics_text.mean_between(before, after, metrics_text.UNET_CALL_SECONDS, rows="8")
    assert abs(call - 0.01) < 1e-9


def test_no_calls_means_no_rows_figure():
    before, _ = scrapes()
    assert metrics_text.unet_rows_between(before, before) == {"unet_calls": 0, "rows_per_call": None,
                                                              "calls_by_rows": {}}
    assert metrics_text.unet_rows_between({}, {})["rows_per_call"] is None


def test_orchestration_overhead_rows_are_measured_and_a_miss_is_said():
    before, after = scrapes()
    fields = rows_fields(before, after, intended=8)
    assert fields["rows_per_call_measured"] == 7.4  # from /metrics, not 2 x jobs
    assert fields["rows_per_call_intended"] == 8
    assert fields["calls_by_rows"] == {"4": 1, "6": 1, "8": 8}
    assert "not the intended 8" in fields["rows_note"] and "8 of 10" in fields["rows_note"]
    assert "rows_note" in rows_fields(before, before, intended=8)  # no calls at all: said, not invented
    assert rows_fields(before, before, intended=8)["rows_per_call_measured"] is None


def test_orchestration_overhead_no_note_when_every_call_is_full():
    before = metrics_text.parse("triffusion_unet_batch_rows_count 0\ntriffusion_unet_batch_rows_sum 0\n")
    after = metrics_text.parse('triffusion_unet_batch_rows_count 5\ntriffusion_unet_batch_rows_sum 40\n'
                               'triffusion_unet_call_seconds_count{rows="8"} 5\n')
    fields = rows_fields(before, after, intended=8)
    assert fields["rows_per_call_measured"] == 8.0 and "rows_note" not in fields


def test_unet_serving_marks_claimed_rows_by_what_the_calls_carried():
    before, after = scrapes()
    eight = rows_observed(before, after, 8)
    assert eight["reached"] and eight["calls_at_rows"] == 8 and eight["unet_calls"] == 10
    assert eight["full_call_fraction"] == 0.8 and eight["rows_per_call"] == 7.4
    sixteen = rows_observed(before, after, 16)
    assert not sixteen["reached"] and sixteen["calls_at_rows"] == 0
