"""Progress and status messages go to stderr (through tqdm, so they do not break a progress bar);
results go to stdout, so `nanoforge sample … > out.txt` captures only the text."""

from __future__ import annotations

import sys

from tqdm import tqdm


def info(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
