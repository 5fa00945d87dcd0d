"""Waiting for a descriptor to be readable works whatever its number (select.select refuses 1024
and above, which a process with many files open reaches)."""

from __future__ import annotations

import os
import resource

from cairn.core.waiting import wait_readable


def test_a_descriptor_numbered_above_1024_can_be_waited_for() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if soft <= wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    read, write = os.pipe()
    high = os.dup2(read, wanted)
    try:
        assert not wait_readable(high, 0)
        os.write(write, b"x")
        assert wait_readable(high, 1)
        os.close(write)
        os.read(high, 1)
        assert wait_readable(high, 1)  # its end, as select says of it
    finally:
        os.close(high)
        os.close(read)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
