"""Benchmarks: the agent measured next to a naive bridge and the bare libraries, in one run (`python -m bench`).

May import: every layer of `agent` (it measures them, and borrows the simulator and the local broker
from `agent.devtools`). Nothing in `agent` imports `bench`; it is not installed with the package.
"""
