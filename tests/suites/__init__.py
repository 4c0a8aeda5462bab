"""Reliability suites of issue #5: crash, network faults and outage (plus the fault proxy)."""
