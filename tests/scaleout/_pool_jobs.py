"""Jobs for the WarmPool test, in a module without heavy imports (each spawned worker imports it)."""

import os


def fail_on_odd(x: int) -> int:
    """x * 10 for even x; a ValueError for odd x, and a hard exit of the worker for 3."""
    if x == 3:
        os._exit(5)
    if x % 2:
        raise ValueError(f"odd {x}\nsecond line")
    return x * 10


def nap(seconds: float) -> float:
    """Sleep, then return the seconds slept: a job long enough to be caught running."""
    import time

    time.sleep(seconds)
    return seconds
