"""Garbage-collector pauses in a served process (triffusion.heap): start-up's objects frozen out of full
collections, and each collection timed."""

import gc
import subprocess
import sys

from triffusion.heap import GcPauses


def test_settling_takes_start_ups_objects_out_of_every_full_collection():
    """In a process that imports what the orchestrator's stub imports (torch, onnxruntime, scipy), a full
    collection scans hundreds of thousands of objects; after `settle`, only what was made since."""
    code = (
        "import gc, time\n"
        "import triffusion.orchestrator.config, triffusion.orchestrator.engine, triffusion.orchestrator.runner\n"
        "import onnxruntime, scipy.optimize\n"
        "from triffusion.heap import settle\n"
        "def longest():\n"
        "    times = []\n"
        "    for _ in range(3):\n"
        "        t = time.perf_counter(); gc.collect(2); times.append(time.perf_counter() - t)\n"
        "    return min(times)\n"
        "tracked = len(gc.get_objects())\n"
        "before = longest()\n"
        "frozen = settle()\n"
        "after = longest()\n"
        "print(tracked, frozen, len(gc.get_objects()), before, after)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tracked, frozen, left, before, after = done.stdout.split()
    assert int(tracked) > 100_000 and int(frozen) >= 0.9 * int(tracked)
    assert int(left) < 0.01 * int(tracked)
    assert float(after) < 0.05 * float(before)


def test_gc_pauses_counts_and_times_each_generation_until_removed():
    pauses = GcPauses().install()
    try:
        gc.collect(2)
        gc.collect(0)
        report = pauses.report()
        assert report["collections"][2] >= 1 and report["collections"][0] >= 1
        assert report["longest_ms"][2] > 0.0
        assert report["frozen"] == gc.get_freeze_count()
    finally:
        pauses.remove()
    counted = pauses.report()["collections"]
    gc.collect(2)
    assert pauses.report()["collections"] == counted
