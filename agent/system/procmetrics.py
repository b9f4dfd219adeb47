"""The process_* metrics under the unit's ProcSubset=pid, where /proc/stat (the boot time) is hidden."""

from __future__ import annotations

import time

from prometheus_client import ProcessCollector


class ProcessMetrics(ProcessCollector):
    """prometheus-client's ProcessCollector, which exports nothing at all when it cannot read the boot time
    from /proc/stat (hidden by ProcSubset=pid; /proc/self stays readable). Then the boot time is what
    /proc/stat would say: the wall clock minus CLOCK_BOOTTIME. tests/test_install.py runs it under such a
    /proc, so a prometheus-client that no longer calls `_boot_time` fails there, not on a device."""

    def _boot_time(self) -> float | None:
        try:
            return super()._boot_time()
        except OSError:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
