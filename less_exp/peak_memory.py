"""Peak memory of a stretch of work, measured rather than estimated, on CPU or GPU.

GPU: the caching allocator's peak (``torch.cuda.max_memory_allocated``) after a reset. CPU: the
process's resident high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` (Linux 4.0+).
Inside the stretch glibc's malloc maps every block of 1 MiB or more on its own (``mallopt``), so a
freed tensor leaves the resident set at once and the mark follows live tensors, not the allocator's
free lists (which are handed back to the system when the stretch begins); after it, blocks up to
32 MiB come from the heap again (the ceiling glibc's own threshold
rises to), so timings taken outside a stretch are not slowed by fresh pages. Either way the figure is
the growth above the memory held when the stretch began.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3
MEASURING, TIMING = 1 << 20, 32 << 20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _resident(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{_STATUS} has no {field}")


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _map_blocks_from(size: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, size)
        libc.malloc_trim(0)  # free heap pages go back first, so later growth is not hidden in them


def supported(device: torch.device) -> bool:
    """Whether :class:`PeakMemory` can measure on ``device`` here."""
    if device.type == "cuda":
        return True
    try:
        _resident("VmHWM")
        return _CLEAR_REFS.exists()
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` is the peak growth during the block
    (None where it cannot be measured)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        self._ok = supported(self.device)
        if not self._ok:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _map_blocks_from(MEASURING)
            _CLEAR_REFS.write_text("5")
            self._start = _resident("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if not self._ok:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _resident("VmHWM")
            _map_blocks_from(TIMING)
        self.bytes = max(0, peak - self._start)
