"""Host-side runtime settings: the allocator keeps freed activation memory for reuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter per case: glibc's thresholds are process-wide and move as a process allocates.
# Where a 24 MiB block comes from (the brk heap, or an mmap of its own that free() hands back to the OS) and
# whether freeing and asking again returns the same block: the allocator's behaviour, not its timing.
MALLOC_24MIB = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "keep":
        from pgolf.runtime import keep_freed_memory
        assert keep_freed_memory()
    p = libc.malloc(24 << 20)
    heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if "[heap]" in line]
    on_heap = any(int(lo, 16) <= p < int(hi, 16) for lo, hi in heap)
    libc.free(p)
    q = libc.malloc(24 << 20)
    print(on_heap, p == q)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_serves_activation_sized_blocks_from_the_heap() -> None:
    def where(mode: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", MALLOC_24MIB, mode], capture_output=True, text=True, check=True, timeout=120
        )
        return out.stdout.split()

    # by default a 24 MiB block is an mmap of its own, unmapped on free (every step faults it back in);
    # kept, it comes from the heap and the same block is reused
    assert where("default")[0] == "False"
    assert where("keep") == ["True", "True"]
