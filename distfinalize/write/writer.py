"""Write one safetensors file, or one rank's byte range of it, streaming: the header is known from the plan
(distfinalize/layout.py), tensors go to their offsets.

The safetensors library serializes a whole file from memory at once; writing tensor by tensor at
precomputed offsets keeps a rank's memory to the tensors in flight instead of the whole file.
Runs on: the rank that writes the file, or each rank that writes a piece of it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from distfinalize.layout import DEFAULT_METADATA, FileLayout, TensorSlot, aligned, layout

__all__ = ["DEFAULT_METADATA", "FileLayout", "SafetensorsWriter", "StageBuffer", "TensorSlot", "aligned", "layout"]

DIRECT_ALIGNMENT = 4096  # O_DIRECT wants buffer, offset and length on the device's logical blocks (<= 4 KiB)
STAGE_BYTES = 32 * 2**20  # one O_DIRECT write
HOLD_BYTES = 64 * 2**20  # blocks held until their turn (a weight's scales), per file


class StageBuffer:
    """A page-aligned buffer that gathers a file's bytes into large O_DIRECT writes; one per writer thread,
    reused from file to file (its pages are touched once)."""

    def __init__(self, nbytes: int = STAGE_BYTES) -> None:
        self.memory = mmap.mmap(-1, nbytes)  # anonymous maps are page-aligned
        self.tensor = torch.frombuffer(self.memory, dtype=torch.uint8)
        self.view = memoryview(self.memory)

    def __len__(self) -> int:
        return len(self.memory)


class SafetensorsWriter:
    """Writes a file laid out by `layout` (or with `span`, bytes [start, stop) of it), one tensor at a time; fsyncs
    on close and returns the sha256 of the bytes it wrote (the file's, when it wrote all of it).

    A writer of a span opens the file without truncating it (other ranks write the other spans, in any order)
    and sizes it to the whole file; the header goes with the span that starts at 0. With O_DIRECT, its first
    bytes up to a block boundary and its last ones after one go through the page cache: a block shared with the
    next span is never padded over.

    Tensors in file order are hashed as they go. With a `stage` buffer and a file system that takes O_DIRECT,
    their bytes are gathered in the buffer and written in large aligned blocks past the page cache: no copy into
    cache pages the kernel first has to allocate, and no cache growing by the size of the output (the last block
    is padded, then the file truncated to its size). Otherwise, or when the file system refuses an O_DIRECT write,
    they go through the page cache as they are. A tensor out of file order turns the rest of the file to the page
    cache, and the file is read back once to hash it (the plan lays out and orders every file so this does not
    happen: see plan.file_layout).
    """

    def __init__(
        self,
        path: Path,
        file_layout: FileLayout,
        stage: StageBuffer | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.layout = file_layout
        self.whole = span is None or tuple(span) == (0, file_layout.size)
        self.start, self.stop = span or (0, file_layout.size)
        self.written: set[str] = set()
        self.rows: dict[str, int] = {}  # rows written so far of tensors written in blocks
        self.held: dict[int, torch.Tensor] = {}  # bytes that came before their turn, by file offset (HOLD_BYTES)
        self.held_bytes = 0
        self.position = self.start  # the file offset the bytes handed over in file order have reached
        self.placed = 0  # bytes handed over
        self.in_order = True  # every tensor so far came in file order: the digest is the file's
        self.digest = hashlib.sha256()
        self.stage = stage
        self.staged = 0  # bytes waiting in the stage buffer, which starts at file offset position - staged
        self.fd, self.direct = open_output(path, direct=stage is not None, truncate=self.whole)
        os.ftruncate(self.fd, file_layout.size)  # the same size from every writer: nothing written is cut
        if self.start == 0:
            self._append(torch.frombuffer(bytearray(file_layout.header), dtype=torch.uint8))

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> None:
        """Write `tensor` (CPU, the planned dtype) into its slot: the whole tensor, or (`row`) a block of its rows
        starting at that row. A block that comes before its turn is held until the bytes before it are written,
        up to HOLD_BYTES (a weight's scales, written after its data); beyond that the file leaves file order."""
        slot = self.layout.slots[name]
        whole = row is None
        if tensor.dtype != slot.dtype or (
            tuple(tensor.shape) != slot.shape
            if whole
            else tuple(tensor.shape[1:]) != slot.shape[1:] or row + tensor.shape[0] > slot.shape[0]
        ):
            got = f"{tensor.dtype} {list(tensor.shape)}" + ("" if whole else f" at row {row}")
            raise ValueError(f"tensor {name!r} is {got}, planned {slot.dtype} {list(slot.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        offset = slot.start if whole else slot.start + row * (slot.end - slot.start) // max(1, slot.shape[0])
        if offset < self.start or offset + data.numel() > self.stop:
            raise ValueError(f"tensor {name!r}: bytes [{offset}, {offset + data.numel()}) lie outside this writer's")
        self.placed += data.numel()
        self._place(data, offset)
        if not whole:
            self.rows[name] = self.rows.get(name, 0) + tensor.shape[0]
        if whole or self.rows[name] == slot.shape[0]:
            self.written.add(name)

    def _place(self, data: torch.Tensor, offset: int) -> None:
        if self.in_order and offset == self.position:
            self._append(data)
            while self.position in self.held:
                early = self.held.pop(self.position)
                self.held_bytes -= early.numel()
                self._append(early)
        elif self.in_order and offset > self.position and self.held_bytes + data.numel() <= HOLD_BYTES:
            self.held[offset] = data
            self.held_bytes += data.numel()
        else:
            self._leave_order()
            self._pwrite(memoryview(data.numpy()), offset)

    def _leave_order(self) -> None:
        """Write what is staged and go on through the page cache, at each tensor's offset."""
        if not self.in_order:
            return
        if self.direct:
            self._leave_direct()
        if self.staged:
            self._flush()
        self.in_order = False
        for offset, early in sorted(self.held.items()):
            self._pwrite(memoryview(early.numpy()), offset)
        self.held.clear()
        self.held_bytes = 0

    def _append(self, data: torch.Tensor) -> None:
        """The next bytes of the file: hashed, then written (or staged). With O_DIRECT, bytes before the first
        block boundary of a span that starts inside a block go through the page cache."""
        self.digest.update(memoryview(data.numpy()))
        if self.direct and not self.staged and self.position % DIRECT_ALIGNMENT:
            head = min(data.numel(), -self.position % DIRECT_ALIGNMENT)
            self._cached_pwrite(memoryview(data[:head].numpy()), self.position)
            self.position += head
            data = data[head:]
        if not self.direct:
            self._pwrite(memoryview(data.numpy()), self.position)
            self.position += data.numel()
            return
        done = 0
        while done < data.numel():
            n = min(data.numel() - done, len(self.stage) - self.staged)
            self.stage.tensor[self.staged : self.staged + n].copy_(data[done : done + n])
            self.staged += n
            done += n
            self.position += n
            if self.staged == len(self.stage):
                self._flush()

    def _flush(self) -> None:
        """Write the staged bytes at their offset. With O_DIRECT, whole blocks (the file's last one padded, the
        padding cut at close); a span's last partial block, which the next span shares, through the page cache."""
        start, staged = self.position - self.staged, self.staged
        self.staged = 0
        if not self.direct:
            self._pwrite(self.stage.view[:staged], start)
            return
        tail = staged % DIRECT_ALIGNMENT if self.position < self.layout.size else 0
        blocks = staged - tail
        if blocks:
            padded = -(-blocks // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            self.stage.tensor[blocks:padded].zero_()
            try:
                self._pwrite(self.stage.view[:padded], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._leave_direct()  # the file system took the open but not the write
                self._pwrite(self.stage.view[:staged], start)
                return
        if tail:
            self._cached_pwrite(self.stage.view[blocks:staged], start + blocks)

    def _cached_pwrite(self, data: memoryview, offset: int) -> None:
        """Write through the page cache (bytes that do not fill an O_DIRECT block of their own)."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        try:
            self._pwrite(data, offset)
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def _leave_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def close(self) -> str:
        """Check every tensor (or every byte of the span) was written, fsync and close. Returns the sha256 (hex) of
        the bytes written: the file's, or the span's."""
        try:
            missing = self.layout.slots.keys() - self.written
            if self.whole and missing:
                raise RuntimeError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. {min(missing)}")
            wanted = self.stop - max(self.start, len(self.layout.header))
            if self.placed != wanted:
                raise RuntimeError(
                    f"{self.path.name}: {self.placed} of the {wanted} bytes of [{self.start}, {self.stop}) written"
                )
            if self.staged:
                self._flush()
            os.ftruncate(self.fd, self.layout.size)  # drops the last block's padding
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.digest.hexdigest() if self.in_order else range_sha256(self.path, self.start, self.stop)

    def abort(self) -> None:
        os.close(self.fd)


def open_output(path: Path, direct: bool, truncate: bool = True) -> tuple[int, bool]:
    """Open `path` for writing, with O_DIRECT when asked and the platform and file system take it; created when
    missing, emptied first only with `truncate` (one writer for the whole file). A symlink in its place is refused
    (ELOOP): a resumed run reopens files in a staging dir it did not just create."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs on older kernels)
                raise
    return os.open(path, flags, 0o644), False


def file_sha256(path: Path, block: int = 16 * 2**20) -> str:
    """sha256 of a file, read in blocks (the same digest the Hub records for LFS files)."""
    return range_digests(path, (), block)[0]


def range_sha256(path: Path, start: int, stop: int, block: int = 16 * 2**20) -> str:
    """sha256 of bytes [start, stop) of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = stop - start
        while left > 0 and (chunk := f.read(min(block, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def range_digests(path: Path, bounds: Sequence[int], block: int = 16 * 2**20) -> tuple[str, list[str]]:
    """In one pass: the sha256 of the whole file and of each range between consecutive `bounds` (offsets from
    0 to the file's size; none: the whole file alone). A range the file does not fill hashes what is there."""
    whole = hashlib.sha256()
    ranges = [hashlib.sha256() for _ in range(max(0, len(bounds) - 1))]
    position, current = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            whole.update(chunk)
            view = memoryview(chunk)
            while ranges and len(view) and current < len(ranges):
                take = min(len(view), bounds[current + 1] - position)
                ranges[current].update(view[:take])
                view, position = view[take:], position + take
                if position == bounds[current + 1]:
                    current += 1
            position += len(view)
    return whole.hexdigest(), [r.hexdigest() for r in ranges]
