"""What the readers of `nanoforge extract`'s inputs yield (`nanoforge.data.sources`, `nanoforge.data.warc`):
a raw record per page or text, and the count of records skipped, by reason (listed in `sources`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# damage worth a warning; the other reasons (request records, 404s, images) are what any crawl holds
DAMAGE_REASONS = frozenset({"truncated_gzip", "bad_length", "bad_warc_header", "bad_http_header", "undecodable"})


@dataclass
class RawRecord:
    """One page or text from an input, before extraction."""

    url: str
    date: str  # fetch date (WARC-Date, ISO 8601) or "" where the input has none
    kind: str  # "html": payload is the page's bytes; "text": payload is plain text
    payload: bytes | str
    content_type: str = ""  # the MIME type the server declared, lower case, no parameters
    charset_hint: str = ""  # the charset the server declared, if any
    source_file: str = ""  # the input file's name
    offset: int = 0  # where the record starts in the file (a .gz file: its gzip member); line/row for JSONL/Parquet
    id: str = ""  # an id the input already carries (JSONL/Parquet `id`), else ""
    truncated: bool = False  # the payload was longer than the reader's max_bytes and was cut


@dataclass
class SkipCounter:
    """Skipped records by reason, and where the first of each reason was (for a one-time warning)."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)
