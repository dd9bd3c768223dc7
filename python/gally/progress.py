"""Progress bars for long work that writes to the cache (fetching, converting, quantizing): on
stderr, drawn only once the work has taken a second and only on a terminal, erased when done;
piped or redirected output gets none (the one line that says what is being made stays)."""

from __future__ import annotations

import os
import sys
from typing import Optional


def progress_bar(total: int, desc: str, progress: Optional[bool] = None):
    """A byte-counting tqdm bar (a context manager; bar.update(n) as bytes are done). progress:
    None draws it when stderr is a terminal, True always, False never."""
    from tqdm import tqdm

    try:  # a terminal that reports no size (a bare pty) would get no bar from tqdm: give it 80 × 24
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    shape = {} if size.columns and size.lines else {"ncols": 80, "nrows": 24}
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0, leave=False,
                disable=None if progress is None else not progress, **shape)
