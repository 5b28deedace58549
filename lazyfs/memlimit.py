"""`--memory-limit`, of `mount` and `bake` (pure): its bounds, its default,
and the parallel GETs it allows.  What awscrt's client makes of it is
crtlimits.py's business.
"""

from __future__ import annotations

MiB = 1 << 20

# What the process may use beyond Python and boto3 themselves (about 100 MiB):
# a mount's mapped pages of files being read, and every command's buffers of
# the ranged GETs in flight.  256 MiB holds 16 GETs (the default
# --max-connections) with room to spare, and is awscrt's least (crtlimits).
DEFAULT = 256 * MiB
# Below this a mount could not map even a few pages while one GET runs.
SMALLEST = 32 * MiB
# More memory than any machine has: a larger value is a slip of the keyboard.
# Past 32 EiB it would also break the CRT client, which reads its buffers'
# size (half of this) as a 64-bit count and silently wraps a larger one
# (2^65 + 256 MiB became 128 MiB, which it refused: an internal error).
LARGEST = 1 << 50  # 1 PiB

# A ranged GET in flight holds about this much: a 256 KiB piece being written,
# socket and parser buffers, the worker thread's stack.
_PER_GET = 2 * MiB


def parallel_gets(memory_limit: int, max_connections: int) -> int:
    """The GETs in flight the limit allows: half of it for them (a mount maps
    pages with a quarter), at 2 MiB each, at most `max_connections`, at least one."""
    return max(1, min(max_connections, (memory_limit // 2) // _PER_GET))
