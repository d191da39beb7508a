"""Per-sample records beside a frame dataset: one LMDB file of named arrays per sample (e.g. cached teacher targets).

Layout of a store file:

    b"0", b"1", ... -> pickled {field: np.ndarray | float} of that dataset index, the fields of b"fields"
    b"fields"       -> JSON list of the field names every record holds
    b"length"       -> pickled int, samples of the dataset
    b"done"         -> pickled int, records 0..done-1 are written (the resume point)

`RecordWriter.append` writes records and the new `done` in one transaction, so a killed writer resumes after
its last whole append. `RecordReader` reads through `kdaug.data.lmdb`'s per-process environments: each
process (a DataLoader worker after fork) opens the file once, on its first read.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb

from kdaug.data.lmdb import acquire_env, read_key, release_env
from kdaug.data.lmdb_file import check_lmdb_file, damaged
from kdaug.errors import KdaugError, write_error

FIELDS_KEY = b"fields"
LENGTH_KEY = b"length"
DONE_KEY = b"done"


def _progress(txn: lmdb.Transaction, path: Path) -> tuple[tuple[str, ...] | None, int | None, int]:
    """(fields or None, length or None if never started, records done)."""
    try:
        raw_fields, raw_length, raw_done = (read_key(txn, key, path) for key in (FIELDS_KEY, LENGTH_KEY, DONE_KEY))
        fields = None if raw_fields is None else tuple(json.loads(raw_fields))
        length = None if raw_length is None else int(pickle.loads(raw_length))
        done = 0 if raw_done is None else int(pickle.loads(raw_done))
    except (ValueError, TypeError, pickle.UnpicklingError) as err:
        raise damaged(path, f"bookkeeping keys: {err}") from err
    return fields, length, done


class RecordWriter:
    """Appends the records of a dataset of `length` samples to the store at `path` (created, or resumed)."""

    def __init__(self, path: str | os.PathLike, length: int, fields: Sequence[str]) -> None:
        self.path = Path(path)
        self.fields = tuple(fields)
        if self.path.is_file() and self.path.stat().st_size:
            check_lmdb_file(self.path)
        try:
            self._env = lmdb.open(str(self.path), subdir=False, map_size=1 << 28, meminit=False, map_async=False)
        except lmdb.Error as err:
            raise KdaugError(f"cannot write {self.path} ({err})") from err
        with self._env.begin() as txn:
            stored_fields, stored_length, self.done = _progress(txn, self.path)
        if stored_length is None:
            self._put([(FIELDS_KEY, json.dumps(self.fields).encode()), (LENGTH_KEY, pickle.dumps(length))])
        elif (stored_fields, stored_length) != (self.fields, length):
            self.close()
            msg = (f"{self.path}: holds {stored_length} records of {list(stored_fields or ())}, not {length} of "
                   f"{list(self.fields)}; write to a new folder")
            raise KdaugError(msg)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Store `records` as samples done, done+1, ... and advance `done`, in one transaction."""
        for record in records:
            if tuple(record) != self.fields:
                msg = f"{self.path}: a record holds {list(record)}, expected {list(self.fields)}"
                raise ValueError(msg)
        items = [(str(self.done + k).encode(), pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
                 for k, record in enumerate(records)]
        self._put([*items, (DONE_KEY, pickle.dumps(self.done + len(records)))])
        self.done += len(records)

    def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as err:  # LMDB reports a short write (a full disk) as an I/O error
                raise write_error(self.path, OSError(str(err))) from err

    def close(self) -> None:
        self._env.close()


class RecordReader:
    """Read access to a store; `fields`, `length` and `done` are read when it is made (a whole file is checked)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        check_lmdb_file(self.path)
        env = acquire_env(self.path)
        try:
            with env.begin() as txn:
                fields, self.length, self.done = _progress(txn, self.path)
        finally:
            release_env(self.path)
        self.fields = fields or ()
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():  # first read in this process (or a forked worker)
            self._env = acquire_env(self.path)
            self._pid = os.getpid()
        return self._env

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The record of sample `index` ({field: array or float})."""
        with self._environment().begin() as txn:
            raw = read_key(txn, str(index).encode(), self.path)
        if raw is None:
            msg = f"{self.path}: has no record {index}"
            raise KdaugError(msg)
        try:
            return pickle.loads(raw)
        except Exception as err:  # any unpickling failure means damage
            raise damaged(self.path, f"record {index} cannot be unpickled ({type(err).__name__})") from err

    def close(self) -> None:
        """Give back this process's environment (reopened by a later read)."""
        if self._env is not None and self._pid == os.getpid():
            release_env(self.path)
        self._env = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_env": None}
