"""`python -m bench.collect --smoke` keeps working: a real subprocess (real Mosquitto, the agent's Service,
the simulator) whose JSON carries every collection figure. No timing is asserted: only that the figures
exist, are numbers, and come from a run that collected (samples arrived, no thread per signal)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT


def number(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_collection_bench_smoke_reports_every_figure(tmp_path):
    out = tmp_path / "collect.json"
    done = subprocess.run([sys.executable, "-m", "bench.collect", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    headline = result["headline"]
    for key in ("idle_cpu_percent_50_signals_1hz_8_ecus", "telemetry_bytes_per_hour", "added_command_p99_ms_busy",
                "one_uds_exchange_ms", "reading_exchange_p99_ms_busy"):
        assert number(headline[key]), key
    assert headline["threads_added_by_the_plan"] == 0  # no thread per signal
    assert result["idle_with_plan"]["signals"] == 50 and result["idle_with_plan"]["readings_ok"] > 0
    assert result["latency_busy_100ms"]["reading_exchange_ms"]["n"] > result["latency_plan_1hz"][
        "reading_exchange_ms"]["n"]  # the busy plan really was busier (its own store, not the 1 Hz plan's)
