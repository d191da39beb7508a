"""Structural check of an LMDB file before it is memory-mapped, so damage is an error and never a signal.

LMDB maps the file and trusts its pages: a truncated file, or a flipped byte in a page or node header,
sends the reader past the end of the mapping (SIGBUS). `check_lmdb_file` reads the meta pages and walks
the branch and leaf pages of both databases (free list and main) with plain reads, checking every page
number, node offset and value size against the file. A file that passes can be read with py-lmdb without
a signal; values themselves are checked when they are decoded (kdaug.data.entries).

On-disk layout (LMDB 0.9, 64-bit, little-endian; names from mdb.c):

    page:  mp_pgno u64 | mp_pad u16 | mp_flags u16 | mp_lower u16 | mp_upper u16 | mp_ptrs u16[]
    meta (at 16 in pages 0 and 1): mm_magic u32 | mm_version u32 | mm_address u64 | mm_mapsize u64
           | mm_dbs[2] (md_pad u32 (page size in dbs[0]) | md_flags u16 | md_depth u16 | 4 x u64 | md_root u64)
           | mm_last_pg u64 | mm_txnid u64
    node:  mn_lo u16 | mn_hi u16 | mn_flags u16 | mn_ksize u16 | key | data
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from kdaug.errors import KdaugError

_PAGE_HEADER = struct.Struct("<QHHHH")
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_NODE = struct.Struct("<HHHH")
_MAGIC, _VERSION = 0xBEEFC0DE, 1
_BRANCH, _LEAF = 0x01, 0x02
_BIGDATA = 0x01
_INVALID_PAGE = 2**64 - 1
_MAX_DEPTH = 32  # LMDB's cursor stack


class DamagedLmdb(KdaugError):
    """An LMDB file that cannot be read safely (truncated, or its pages are damaged)."""


def damaged(path: Path, detail: str) -> DamagedLmdb:
    return DamagedLmdb(f"{path}: truncated or damaged LMDB file ({detail}); restore it from a copy or regenerate it")


def _meta(path: Path, fd: int, offset: int) -> tuple[int, int, int, tuple[int, int], tuple[int, int, int]]:
    """(txnid, page size, last page, (free root, free depth), (main root, main depth, main flags))."""
    raw = os.pread(fd, _PAGE_HEADER.size + _META.size, offset)
    if len(raw) < _PAGE_HEADER.size + _META.size:
        if offset == 0:
            msg = f"{path}: not an LMDB file ({len(raw)} bytes; expected a frame LMDB written by kdaug or fairchem)"
            raise KdaugError(msg)
        raise damaged(path, f"meta page at byte {offset} is cut off")
    fields = _META.unpack_from(raw, _PAGE_HEADER.size)
    magic, version = fields[0], fields[1]
    if (magic, version) != (_MAGIC, _VERSION):
        if offset == 0:
            msg = f"{path}: not an LMDB file (expected a frame LMDB written by kdaug or fairchem)"
            raise KdaugError(msg)
        raise damaged(path, f"meta page at byte {offset} has no LMDB signature")
    free, main = fields[4:12], fields[12:20]
    page_size, last_page, txnid = free[0], fields[20], fields[21]
    return txnid, page_size, last_page, (free[7], free[2]), (main[7], main[2], main[1])


def check_lmdb_file(path: str | os.PathLike) -> None:
    """Raise `DamagedLmdb` (one line naming the file) unless every page py-lmdb may touch lies in the file.

    Reads the meta pages and the branch/leaf pages (not the overflow pages that hold large values).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        first = _meta(path, fd, 0)
        page_size = first[1]
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
            raise damaged(path, f"page size {page_size} in its meta page")
        second = _meta(path, fd, page_size)
        txnid, _, last_page, free_db, main_db = second if second[0] > first[0] else first  # mdb_env_pick_meta
        if (last_page + 1) * page_size > size:
            raise damaged(path, f"{size} bytes, but its last page ends at byte {(last_page + 1) * page_size}")
        if main_db[2] != 0:
            raise damaged(path, f"main database flags {main_db[2]:#x}; expected a plain key-value database")
        walker = _PageWalker(path, fd, page_size, last_page)
        for root, depth in (free_db, main_db[:2]):
            if root != _INVALID_PAGE:
                walker.walk(root, min(depth, _MAX_DEPTH))


class _PageWalker:
    def __init__(self, path: Path, fd: int, page_size: int, last_page: int) -> None:
        self.path, self.fd, self.page_size, self.last_page = path, fd, page_size, last_page
        self.seen: set[int] = set()

    def walk(self, root: int, depth: int) -> None:
        stack = [(root, 1)]
        while stack:
            pgno, level = stack.pop()
            if level > max(depth, 1) or pgno in self.seen:
                raise damaged(self.path, f"page {pgno} is referenced twice or the tree is deeper than recorded")
            self.seen.add(pgno)
            stack.extend((child, level + 1) for child in self._page(pgno))

    def _page(self, pgno: int) -> list[int]:
        """Check page `pgno`; return its children (branch) or [] (leaf)."""
        if not 2 <= pgno <= self.last_page:
            raise damaged(self.path, f"page number {pgno} outside pages 2..{self.last_page}")
        page = os.pread(self.fd, self.page_size, pgno * self.page_size)
        stored, _, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
        if stored != pgno or flags & (_BRANCH | _LEAF) not in (_BRANCH, _LEAF) or flags & ~0xC013:
            raise damaged(self.path, f"page {pgno} has a bad header")
        if not _PAGE_HEADER.size <= lower <= upper <= self.page_size or (lower - _PAGE_HEADER.size) % 2:
            raise damaged(self.path, f"page {pgno} has bad bounds {lower}..{upper}")
        n_nodes = (lower - _PAGE_HEADER.size) // 2
        offsets = struct.unpack_from(f"<{n_nodes}H", page, _PAGE_HEADER.size)
        children = []
        for offset in offsets:
            if not upper <= offset <= self.page_size - _NODE.size:
                raise damaged(self.path, f"page {pgno} has a node outside the page")
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, offset)
            end = offset + _NODE.size + key_size
            if flags & _BRANCH:
                children.append(lo | hi << 16 | node_flags << 32)
            elif node_flags & ~_BIGDATA:
                raise damaged(self.path, f"page {pgno} has a node with flags {node_flags:#x} (sub-databases)")
            elif node_flags & _BIGDATA:
                end += 8
                if end <= self.page_size:
                    self._check_overflow(pgno, struct.unpack_from("<Q", page, end - 8)[0], lo | hi << 16)
            else:
                end += lo | hi << 16
            if end > self.page_size:
                raise damaged(self.path, f"page {pgno} has a node running past the page")
        if flags & _BRANCH and not children:
            raise damaged(self.path, f"branch page {pgno} is empty")
        return children

    def _check_overflow(self, pgno: int, first: int, value_size: int) -> None:
        n_pages = (_PAGE_HEADER.size - 1 + value_size) // self.page_size + 1
        if first < 2 or first + n_pages - 1 > self.last_page:
            raise damaged(self.path, f"page {pgno} has a value on pages {first}..{first + n_pages - 1}, "
                                      f"outside pages 2..{self.last_page}")
