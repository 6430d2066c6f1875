"""Point tables: CSV and Parquet files of world points, read and written in batches.

A points file holds world coordinates in columns ``x``, ``y``, ``z`` and any other
columns, which are carried through untouched. Local paths and ``s3://`` URIs alike.
What this module does for a transform of millions of rows, out of core:

- ``check_points_file`` reads the header or Parquet footer (and counts CSV rows by
  streaming) and checks the x, y, z columns; ``batch_ranges`` cuts the rows into batches.
- ``read_batch`` reads rows [start, stop) only (``read_batch_table``: a Parquet file's,
  as an Arrow table); ``write_part`` (``write_part_table``) writes a batch as its own
  Parquet part, ``<OUT>.parts/<index>.parquet`` (``part_uri``).
- ``concatenate_parts`` streams the parts, in batch order, into OUT (CSV or Parquet by
  its extension) one row group at a time, then removes the parts folder.

Outputs appear only once fully written. What moves the points is dreg.apply.points.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dreg.errors import InputError, StorageError, describe
from dreg.io import storage

COORDINATES = ("x", "y", "z")
CSV = "csv"
PARQUET = "parquet"
FORMATS = {".csv": CSV, ".parquet": PARQUET, ".pq": PARQUET}
"""Points file formats by file extension (case-insensitive)."""

BATCH_ROWS = 1_000_000
"""Rows per batch (one task): about 100 MB of a typical table in memory."""
PART_ROW_GROUP_ROWS = 1 << 17
"""Rows per row group of a part, and so of a Parquet output: the unit that
concatenation holds in memory."""
PART_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False,
                      "write_page_checksum": True}
"""How parts are written: read once, soon after, from the same storage, so neither
compressed nor dictionary-encoded (which cost most of writing a part, and of reading
it back), only checksummed."""
OUTPUT_WRITE_OPTIONS = {"dictionary_pagesize_limit": 1 << 16, "write_page_checksum": True}
"""How a Parquet output is written: Parquet's defaults (snappy), but a column chunk
gives up dictionary encoding once its dictionary passes 64 KiB instead of 1 MiB.
Columns of repeated values (labels) keep their dictionary; columns of distinct values
(moved coordinates, ids) stop trying after a few thousand rows: the default tried each
whole row group, most of the time of writing it, for a larger file."""
CSV_COUNT_ROWS = 1 << 18
SAMPLE_ROWS = 1000
"""Rows whose x, y, z are checked to be numbers while a transform is planned (a Parquet
file's column types are checked for all rows), so that text in a coordinate column is
refused in a second, not inside a task."""
# Only the trailing newlines matter when looking for blank lines at the end of a CSV.
CSV_TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class PointsFile:
    """A checked points file: where it is, its format, row count and column names.

    `rows` is None when it was not counted (CSV opened for one batch only).
    """

    uri: str
    format: str
    rows: int | None
    columns: tuple[str, ...]


# ----------------------------------------------------------------------------- formats


def points_format(uri: str) -> str:
    """The format ("csv" or "parquet") of a points file or output, from its extension."""
    extension = posixpath.splitext(str(uri))[1].lower()
    if extension not in FORMATS:
        known = ", ".join(FORMATS)
        raise InputError(f"{uri}: unknown points file extension {extension or '(none)'!r} "
                         f"(use one of {known})")
    return FORMATS[extension]


@contextmanager
def _open_input(uri: str) -> Iterator[BinaryIO]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        yield handle


# ----------------------------------------------------------------------------- checking


def check_points_file(uri: str) -> PointsFile:
    """Check a points file and describe it, reading only its header or Parquet footer.

    A CSV's rows are counted by streaming through the file, never holding it whole.
    Raises InputError naming the file when its extension is unknown, it is missing or
    unreadable, or it lacks any of the columns x, y, z.
    """
    return open_points_file(uri, count_rows=True)


def open_points_file(uri: str, count_rows: bool = True) -> PointsFile:
    """As `check_points_file`; with `count_rows` False a CSV is not scanned (rows None),
    which is all one batch needs."""
    uri = storage.normalize_uri(uri)
    fmt = points_format(uri)
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such points file")
    try:
        with _open_input(uri) as handle:
            if fmt == PARQUET:
                metadata = pq.ParquetFile(handle).metadata
                columns, rows = tuple(metadata.schema.to_arrow_schema().names), metadata.num_rows
            else:
                columns = _csv_columns(uri, handle)
                rows = _count_csv_rows(handle) if count_rows else None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear line
        raise InputError(f"{uri}: not a readable {fmt.upper()} points file ({describe(exc)})"
                         ) from None
    _check_columns(uri, columns)
    points = PointsFile(uri=uri, format=fmt, rows=rows, columns=columns)
    if count_rows:
        _check_coordinate_sample(points)
    return points


def _check_coordinate_sample(points: PointsFile) -> None:
    """Refuse a file whose x, y, z are not numbers: by the column types of a Parquet
    file, and by the first SAMPLE_ROWS rows of a CSV. Missing values are allowed (they
    become NaN points); text is not."""
    if points.format == PARQUET:
        with _open_input(points.uri) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        for name in COORDINATES:
            kind = schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                    or pa.types.is_null(kind) or pa.types.is_decimal(kind)):
                raise InputError(f"{points.uri}: column {name} holds {kind} values, not "
                                 "numbers")
        return
    frame = read_batch(points, 0, SAMPLE_ROWS)
    for name in COORDINATES:
        column = frame[name]
        numbers = pd.to_numeric(column, errors="coerce")
        bad = column[numbers.isna() & column.notna()]
        if len(bad):
            raise InputError(f"{points.uri}: column {name} holds values that are not "
                             f"numbers (row {bad.index[0]}: {str(bad.iloc[0])[:40]!r})")


def _check_columns(uri: str, columns: Sequence[str]) -> None:
    missing = [c for c in COORDINATES if c not in columns]
    if missing:
        shown = ", ".join(map(str, columns[:20])) + (", ..." if len(columns) > 20 else "")
        raise InputError(f"{uri}: missing column(s) {', '.join(missing)} "
                         f"(points need x, y, z; the file has: {shown or 'no columns'})")


def _csv_columns(uri: str, handle: BinaryIO) -> tuple[str, ...]:
    try:
        header = pd.read_csv(handle, nrows=0, index_col=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{uri}: empty CSV file (no header line)") from None
    return tuple(str(c) for c in header.columns)


def _count_csv_rows(handle: BinaryIO) -> int:
    """Data records of a CSV as `read_batch` numbers them.

    Counted with the parser and settings that `read_batch` skips rows with, so that the
    two agree on where row k is: quoted newlines stay inside their record, and blank
    lines count as (empty) rows, since pandas' skiprows counts them. Blank lines after
    the last record are not rows.
    """
    handle.seek(0)
    records = sum(
        len(piece)
        for piece in pd.read_csv(handle, usecols=[0], dtype=str, skip_blank_lines=False,
                                 index_col=False, chunksize=CSV_COUNT_ROWS)
    )
    return max(records - _trailing_blank_lines(handle), 0)


def _trailing_blank_lines(handle: BinaryIO) -> int:
    """How many blank lines follow the last record of a CSV (pandas reads each as a row
    of NaN with skip_blank_lines off; nobody means them as points)."""
    size = handle.seek(0, io.SEEK_END)
    handle.seek(max(size - CSV_TAIL_BYTES, 0))
    tail = handle.read()
    ending = tail[len(tail.rstrip(b"\r\n")):]
    # One line break ends the last record; each further one is a blank line.
    return max(ending.count(b"\n") - 1, 0)


# ----------------------------------------------------------------------------- reading


def read_batch(points: PointsFile, start: int, stop: int) -> pd.DataFrame:
    """Rows [start, stop) of a points file, in file order, indexed start..stop-1.

    Reads only what those rows need: for Parquet, the row groups that overlap them; for
    CSV, the parser skips the rows before `start` and stops after `stop`. Columns keep
    their order; extra columns keep the dtypes pandas reads them with (every column stored
    in a Parquet file is a column of the frame, also a stored pandas index).
    """
    if not 0 <= start <= stop:
        raise ValueError(f"rows [{start}, {stop}) are not a valid range")
    if points.rows is not None:
        stop = min(stop, points.rows)
        start = min(start, stop)
    try:
        with _open_input(points.uri) as handle:
            if points.format == PARQUET:
                frame = _read_parquet_rows(handle, start, stop)
            else:
                frame = _read_csv_rows(handle, points.columns, start, stop)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear line
        raise InputError(f"{points.uri}: cannot read rows {start} to {stop} "
                         f"({describe(exc)})") from None
    frame.index = pd.RangeIndex(start, start + len(frame))
    return frame


def read_batch_table(points: PointsFile, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet points file as an Arrow table, in file order, with
    the file's own column types and schema metadata: what `read_batch` reads, without
    converting to pandas (the transformed rows are written back from it unchanged)."""
    if points.format != PARQUET:
        raise ValueError(f"{points.uri}: read_batch_table reads Parquet files only")
    if not 0 <= start <= stop:
        raise ValueError(f"rows [{start}, {stop}) are not a valid range")
    try:
        with _open_input(points.uri) as handle:
            return _read_parquet_table(handle, start, stop)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear line
        raise InputError(f"{points.uri}: cannot read rows {start} to {stop} "
                         f"({describe(exc)})") from None


def _read_parquet_table(handle: BinaryIO, start: int, stop: int) -> pa.Table:
    parquet = pq.ParquetFile(handle)
    ends = np.cumsum([parquet.metadata.row_group(g).num_rows
                      for g in range(parquet.metadata.num_row_groups)])
    starts = ends - np.diff(ends, prepend=0)
    groups = [int(g) for g in np.flatnonzero((starts < stop) & (ends > start))]
    if not groups:
        return parquet.schema_arrow.empty_table()
    # One thread: a batch is one task on a single-threaded worker.
    table = parquet.read_row_groups(groups, use_threads=False)
    return table.slice(start - int(starts[groups[0]]), stop - start)


def _read_parquet_rows(handle: BinaryIO, start: int, stop: int) -> pd.DataFrame:
    return _plain_frame(_read_parquet_table(handle, start, stop))


def _plain_frame(table: pa.Table, types_mapper: Callable | None = None) -> pd.DataFrame:
    # Without the pandas metadata every stored column stays a column (a stored index
    # would otherwise become the frame's index, and drop out of the written rows).
    return table.replace_schema_metadata(None).to_pandas(types_mapper=types_mapper)


def _read_csv_rows(handle: BinaryIO, columns: Sequence[str], start: int,
                   stop: int) -> pd.DataFrame:
    # An integer skiprows is skipped by the tokenizer without building rows (a set or a
    # callable would cost memory or a Python call per skipped row); the header is
    # skipped with them and its names given back. Blank lines stay rows so that row
    # numbers agree with _count_csv_rows; low_memory off keeps one type per column.
    return pd.read_csv(handle, header=None, names=list(columns), skiprows=start + 1,
                       nrows=stop - start, index_col=False, skip_blank_lines=False,
                       low_memory=False)



# ----------------------------------------------------------------------------- batches and parts


def batch_ranges(rows: int, batch_rows: int = BATCH_ROWS) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of `batch_rows` rows (the last one shorter) covering
    `rows` rows. An empty file still gets one empty batch, whose part carries the
    columns into the output."""
    if rows < 0 or batch_rows < 1:
        raise ValueError(f"need rows >= 0 and batch_rows >= 1, got {rows}, {batch_rows}")
    if rows == 0:
        return [(0, 0)]
    return [(start, min(start + batch_rows, rows)) for start in range(0, rows, batch_rows)]


def parts_folder(out_uri: str) -> str:
    """The folder of an output's parts: ``<OUT>.parts``."""
    return storage.normalize_uri(out_uri) + ".parts"


def part_uri(out_uri: str, index: int) -> str:
    """The part of batch `index`: ``<OUT>.parts/<index>.parquet``, zero-padded so that
    names sort in batch order."""
    return storage.join(parts_folder(out_uri), f"{index:06d}.parquet")


@contextmanager
def _atomic_output(uri: str) -> Iterator[BinaryIO]:
    """A binary handle whose content appears at `uri` only once fully written.

    Written under a temporary name and moved into place (a rename on disk, a server-side
    copy on S3), so that a task that dies or is retried never leaves a truncated file
    that a later step would take for a whole one.
    """
    fs, path = storage.filesystem(uri)
    temporary = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    if not storage.is_s3(uri):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        with fs.open(temporary, "wb") as handle:
            yield handle
        fs.mv(temporary, path)
    except BaseException:
        if fs.exists(temporary):
            fs.rm(temporary)
        raise


def write_part(frame: pd.DataFrame, uri: str, schema: pa.Schema | None = None) -> None:
    """Write one batch's transformed rows as a Parquet part.

    `schema`, when given (the input's, for a Parquet input), sets the stored types and
    metadata, so that for example an integer column with missing values (a float column
    in pandas) is stored as integers again, and pandas reads the output as it reads the
    input (its stored index and extension dtypes included).
    """
    table = None
    if schema is not None:
        try:
            table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
            table = table.replace_schema_metadata(schema.metadata)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, KeyError):
            table = None  # the values are all that matter: fall back to pandas' types
    if table is None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    with _atomic_output(uri) as handle:
        pq.write_table(table, handle, row_group_size=PART_ROW_GROUP_ROWS, **PART_WRITE_OPTIONS)


def write_part_table(table: pa.Table, uri: str, schema: pa.Schema | None = None) -> None:
    """Write one batch's transformed rows, an Arrow table, as a Parquet part: as
    `write_part`, with the table's columns as they are (cast to `schema`, when given,
    whose metadata is kept)."""
    if schema is not None:
        table = table.cast(schema.remove_metadata()).replace_schema_metadata(schema.metadata)
    with _atomic_output(uri) as handle:
        pq.write_table(table, handle, row_group_size=PART_ROW_GROUP_ROWS, **PART_WRITE_OPTIONS)


def part_schema(points: PointsFile) -> pa.Schema | None:
    """The schema to write a part of `points`' transformed rows with (see `write_part`):
    for a Parquet input its own schema with x, y, z as float64 (transformed coordinates);
    None for a CSV input, whose types pandas infers."""
    if points.format != PARQUET:
        return None
    with _open_input(points.uri) as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    for name in COORDINATES:
        position = schema.get_field_index(name)
        schema = schema.set(position, pa.field(name, pa.float64()))
    return schema


# ----------------------------------------------------------------------------- concatenating


def _merged_type(types: Sequence[pa.DataType]) -> pa.DataType:
    """One type for a column that batches typed differently (CSV types are inferred per
    batch): numbers widen to float64, as pandas reading the whole file would; any other
    mix becomes text."""
    kinds = {t for t in types if not pa.types.is_null(t)}
    if not kinds:
        return pa.null()
    if len(kinds) == 1:
        return kinds.pop()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
        return pa.float64()
    return pa.string()


def _unified_schema(schemas: Sequence[pa.Schema], part_uris: Sequence[str]) -> pa.Schema:
    first = schemas[0]
    for schema, uri in zip(schemas, part_uris, strict=True):
        if schema.names != first.names:
            raise ValueError(f"{uri}: columns {schema.names} differ from the first part's "
                             f"{first.names}")
    fields = [pa.field(name, _merged_type([s.field(i).type for s in schemas]))
              for i, name in enumerate(first.names)]
    unified = pa.schema(fields)
    if all(s.remove_metadata().equals(unified) for s in schemas):
        return unified.with_metadata(first.metadata)
    # The pandas metadata of a part would describe types the output no longer has.
    return unified.with_metadata({k: v for k, v in (first.metadata or {}).items()
                                  if k != b"pandas"})


def _part_schemas(part_uris: Sequence[str]) -> list[pa.Schema]:
    schemas = []
    for uri in part_uris:
        if not storage.exists(uri):
            raise StorageError(f"{uri}: part missing (its batch did not finish)")
        with _open_input(uri) as handle:
            schemas.append(pq.ParquetFile(handle).schema_arrow)
    return schemas


def _row_groups(part_uris: Sequence[str]) -> Iterator[pa.Table]:
    """The parts' rows in order, one row group at a time."""
    for uri in part_uris:
        with _open_input(uri) as handle:
            part = pq.ParquetFile(handle, page_checksum_verification=True)
            for group in range(part.metadata.num_row_groups):
                yield part.read_row_group(group)


# Integers with missing values print as integers (and an empty field), not as floats.
_NULLABLE_INTEGERS = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(),
}


def _write_csv(handle: BinaryIO, schema: pa.Schema, tables: Iterator[pa.Table]) -> int:
    header = _plain_frame(schema.empty_table()).to_csv(index=False, lineterminator="\n")
    handle.write(header.encode())
    rows = 0
    for table in tables:
        frame = _plain_frame(table, types_mapper=_NULLABLE_INTEGERS.get)
        handle.write(frame.to_csv(index=False, header=False, lineterminator="\n").encode())
        rows += table.num_rows
    return rows


def _write_parquet(handle: BinaryIO, schema: pa.Schema, tables: Iterator[pa.Table]) -> int:
    rows = 0
    with pq.ParquetWriter(handle, schema, **OUTPUT_WRITE_OPTIONS) as writer:
        for table in tables:
            if not table.schema.equals(schema, check_metadata=False):
                # safe=False: int64 beyond 2**53 widened to float64 rounds, not fails.
                table = table.cast(schema, safe=False)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def parts_share_schema(points: PointsFile) -> bool:
    """Whether every part of `points`' batches has one schema, known from its first
    part: those of a Parquet input (written with `part_schema`), not a CSV's (whose
    types pandas infers batch by batch)."""
    return points.format == PARQUET


def concatenate_parts(part_uris: Iterable[str], out_uri: str, keep_parts: bool = False,
                      same_schema: bool = False) -> int:
    """Concatenate parts, in the order given, into one CSV or Parquet file (by
    `out_uri`'s extension), then remove the parts and the parts folder ``<OUT>.parts``.

    Streams one row group at a time, never holding all rows. Columns that batches typed
    differently get one type (numbers float64, other mixes text). With `same_schema`
    (parts that `parts_share_schema`), the output takes the first part's schema and the
    parts are read one at a time as `part_uris` yields them, so that the output is
    written while later parts are still being made (the iterable may wait for each).
    The output appears only once complete. Returns the number of rows written.
    """
    out_uri = storage.normalize_uri(out_uri)
    fmt = points_format(out_uri)
    write = _write_parquet if fmt == PARQUET else _write_csv
    if same_schema:
        taken: list[str] = []
        uris = _taken(part_uris, taken)
        first = next(uris, None)
        if first is None:
            raise ValueError("no parts to concatenate (an empty input still has one part)")
        schema = _part_schemas([first])[0]
        with _atomic_output(out_uri) as handle:
            rows = write(handle, schema, _row_groups(_checked(first, uris, schema)))
        part_uris = taken
    else:
        part_uris = [storage.normalize_uri(u) for u in part_uris]
        if not part_uris:
            raise ValueError("no parts to concatenate (an empty input still has one part)")
        schema = _unified_schema(_part_schemas(part_uris), part_uris)
        with _atomic_output(out_uri) as handle:
            rows = write(handle, schema, _row_groups(part_uris))
    if not keep_parts:
        remove_parts(part_uris, out_uri)
    return rows


def _taken(part_uris: Iterable[str], taken: list[str]) -> Iterator[str]:
    """The parts' URIs, normalised, each noted in `taken` as it is yielded."""
    for uri in part_uris:
        uri = storage.normalize_uri(uri)
        taken.append(uri)
        yield uri


def _checked(first: str, rest: Iterator[str], schema: pa.Schema) -> Iterator[str]:
    """`first`, then each later part once it is there with `schema`'s columns (its
    types are cast to `schema`'s when they differ)."""
    yield first
    for uri in rest:
        (found,) = _part_schemas([uri])
        if found.names != schema.names:
            raise ValueError(f"{uri}: columns {found.names} differ from the first part's "
                             f"{schema.names}")
        yield uri


def remove_parts(part_uris: Sequence[str], out_uri: str) -> None:
    """Delete the given parts, and the parts folder of `out_uri` with anything left in
    it (parts of an earlier attempt with other batches)."""
    fs, _ = storage.filesystem(out_uri)
    paths = [storage.filesystem(u)[1] for u in part_uris]
    present = [p for p in paths if fs.exists(p)]
    if present:
        fs.rm(present)
    storage.remove_tree(parts_folder(out_uri))
