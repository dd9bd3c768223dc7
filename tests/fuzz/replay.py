"""Runs stored inputs through their fuzz target, one after the other, in this process; prints one
JSON line per input ({"file", "seconds", "outcome"}) and exits 1 at the first Finding. A crash or a
hang shows as the subprocess's signal or timeout to whoever started it (tests/test_fuzz_corpus.py).

    python tests/fuzz/replay.py TARGET FILE...
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from harness import TARGETS, Finding  # noqa: E402


def main(argv: list[str]) -> int:
    target, files = argv[0], argv[1:]
    run = TARGETS[target]
    with tempfile.TemporaryDirectory(prefix=f"gally-replay-{target}-") as work:
        os.environ["GALLY_HOME"] = os.path.join(work, "home")  # nothing reaches the user's cache
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            print(json.dumps({"file": os.path.basename(path), "start": True}), flush=True)
            t0 = time.perf_counter()
            try:
                outcome = run(data, work)
            except Finding as e:
                print(json.dumps({"file": os.path.basename(path), "finding": str(e)}), flush=True)
                return 1
            print(json.dumps({"file": os.path.basename(path), "seconds": round(time.perf_counter() - t0, 3),
                              "outcome": outcome[:300]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
