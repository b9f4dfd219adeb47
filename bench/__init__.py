"""Benchmarks: the agent measured next to a naive bridge and the bare libraries, in one run (`python -m bench`),
and chaos runs (`python -m bench.chaos`). Scripts that print JSON figures; never part of CI's test time.

May import: every layer of `agent` (it measures them, and borrows the simulator and the local broker
from `agent.devtools`). Nothing in `agent` imports `bench`; it is not installed with the package.
"""
