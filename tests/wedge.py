"""A seed-to-key algorithm that never returns: a misbehaving OEM plugin, to wedge a worker for real."""

import threading


def forever(level, seed, params):
    threading.Event().wait()
