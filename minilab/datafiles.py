"""Reading one data file strictly into rows, each with where it sits in the file.

A split file is `.csv`, `.tsv`, `.jsonl` or `.parquet`. Being strict here is what keeps a run from
training on rows read wrong: a CSV row with an unquoted comma, a quote left open (which would
swallow every row after it into one text), a short row, a JSONL line that is not an object. Each
is one `DataError` that names the file and the line (parquet: the row) to fix. `minilab.data`
turns the rows into texts and labels; `minilab.predict` reads its `--input` files the same way.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")


class DataError(ValueError):
    """The dataset is missing or malformed; the message says what to do."""




@dataclass
class Table:
    """One file's rows (column name -> value), each with where it sits in the file, for messages:
    "line N" for .csv/.tsv (the physical line its record starts on) and .jsonl (the file's own line;
    blank lines are skipped but counted), "row N" for .parquet (the first row is row 1)."""

    path: Path
    columns: list[str]
    rows: list[dict]
    where: list[str]
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # csv/tsv: row -> (first, last) line, when several


def _decode(path: Path) -> str:
    """The file's text as UTF-8 (a byte-order mark dropped: Excel's "CSV UTF-8" writes one, and it would
    stick to the first column's name); a bad byte is one line naming its line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}): save the file as UTF-8") from e


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _csv_error(path: Path, e: csv.Error, first: int, now: int) -> str:
    """One line for what the csv module stopped at, at the line where the record in trouble began."""
    msg = str(e)
    if "unexpected end of data" in msg:
        return (f"{path}, line {first}: a quote opens a text here and never closes (the rest of the file would be one text): "
                'close it, or double a quote that is part of the text ("")')
    if "field larger than field limit" in msg:
        return (f"{path}, line {first}: a text runs past {csv.field_size_limit()} characters from here: a quote that opens "
                'here probably never closes; close it, or double a quote that is part of the text ("")')
    if "expected after" in msg:
        if now > first:
            return (f"{path}, line {first}: a quoted text opens here and runs to line {now}, where a quote is followed by more "
                    f"text ({msg}): a quote is probably left open on line {first}; close it, or double a quote that is part "
                    'of the text ("")')
        return (f"{path}, line {first}: a quote is followed by more text ({msg}): a text with quotes in it must be quoted "
                'whole, its own quotes doubled ("say ""hi"" there")')
    return f"{path}, line {now}: not a valid {path.suffix[1:]} line ({msg}): fix it"


def _read_delimited(path: Path, text: str, delimiter: str) -> Table:
    """Strict CSV/TSV: every record has exactly the header's number of fields, a quote that opens a text
    closes it, and a text spans lines only inside quotes (then it parses as one field, as it should)."""
    holds = "a tab" if delimiter == "\t" else 'a comma ("like, this")'
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows, where, spans = [], [], {}
    last = 0  # the line the previous record ended on
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(_csv_error(path, e, last + 1, reader.line_num)) from e
        first, last = last + 1, reader.line_num
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # a blank line
        if header is None:
            header = record
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataError(f"{path}, line {first}: the header names column(s) {', '.join(map(repr, twice))} more than "
                                "once: give each column its own name")
            continue
        if len(record) != len(header):
            hint = (f"quote a text that holds {holds}, or remove the extra field(s)" if len(record) > len(header)
                    else "fill in the missing field(s) (a text that spans lines must be quoted)")
            raise DataError(f"{path}, {_lines(first, last)}: {len(record)} field{'s' * (len(record) != 1)} where the header has {len(header)} "
                            f"({', '.join(header)}): {hint}")
        if last > first:
            spans[len(rows)] = (first, last)
        rows.append(dict(zip(header, record)))
        where.append(f"line {first}")
    return Table(path, header or [], rows, where, spans)


def _read_jsonl(path: Path, text: str) -> Table:
    """One JSON object per line; blank lines are skipped (and counted)."""
    rows, where, columns = [], [], {}
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}): fix the line, or remove it") from e
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
            raise DataError(f"{path}, line {n}: {kind}, not a JSON object: each line must be one row object, "
                            'such as {"text": "...", "label": 0}')
        rows.append(row)
        where.append(f"line {n}")
        columns.update(dict.fromkeys(row))
    return Table(path, list(columns), rows, where)


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path} is a parquet file and pyarrow is not installed: pip install pyarrow") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) do not always name the file
        raise DataError(f"{path} is not a valid parquet file ({type(e).__name__}: {e}): fix or replace it") from e
    rows = table.to_pylist()
    return Table(path, list(table.column_names), rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def read_table(path: Path) -> Table:
    """A .csv/.tsv/.jsonl/.parquet file's rows, read strictly: anything malformed is one DataError
    that names the file and the line (or parquet row) to fix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, _decode(path), "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return _read_jsonl(path, _decode(path))
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .csv/.tsv/.jsonl/.parquet file as dicts (column name -> value); see `read_table`."""
    return read_table(path).rows
