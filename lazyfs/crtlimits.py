"""What awscrt's S3 client (`--transfer-client crt`) accepts, known before it
is built: a part size it would refuse is a usage error naming the flags
(exit 2) before anything is mounted or baked, not an internal error raised
from inside the client (AWS_ERROR_S3_PART_SIZE_EXCEEDS_MEMORY_LIMIT).

Pure: crt.py sizes the client's buffers with `buffer_memory`, config.py
checks the flags with `check_part_size`, so the two cannot disagree.
"""

from __future__ import annotations

from lazyfs.errors import ConfigError
from lazyfs.sizes import flag_size

# The least memory awscrt's S3 client accepts for its part buffers.
MIN_MEMORY = 256 * 1024 * 1024


def buffer_memory(memory_limit: int) -> int:
    """The client's part buffers for --memory-limit: half of it
    (mapped pages and the process take the rest), at least MIN_MEMORY."""
    return max(MIN_MEMORY, memory_limit // 2)


def largest_part(memory_limit: int) -> int:
    """The largest part the client takes: half its buffers (it refuses a
    larger one), so a quarter of --memory-limit and never under 128 MiB."""
    return buffer_memory(memory_limit) // 2


def check_part_size(part_size: int, memory_limit: int) -> None:
    """ConfigError, one line, if the client would refuse `part_size`.
    `memory_limit`: the command's --memory-limit (a mount's or a bake's)."""
    largest = largest_part(memory_limit)
    if part_size <= largest:
        return
    raise ConfigError(f"--part-size {flag_size(part_size)} is more than --transfer-client crt takes with "
                      f"--memory-limit {flag_size(memory_limit)}: at most {flag_size(largest)} (a quarter of "
                      f"--memory-limit, never under {flag_size(MIN_MEMORY // 2)}); lower --part-size or raise "
                      f"--memory-limit to {flag_size(4 * part_size)}")
