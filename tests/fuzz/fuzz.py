"""Coverage-guided fuzzing of gally's loaders with atheris (libFuzzer for Python), one target at a
time. Seeds come from corpus/<target>/; new inputs the fuzzer keeps go to WORK_CORPUS, outside the
repository. A Finding or unexpected exception does not stop the run: the first input of each kind
(exception type and the line that raised it) is written to FINDINGS with its traceback, and
fuzzing goes on. A crash (signal) or a hang stops libFuzzer, which writes the input to its
-artifact_prefix. See README.md.

    python tests/fuzz/fuzz.py TARGET WORK_CORPUS FINDINGS [libFuzzer flags, e.g. -max_total_time=600]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import atheris  # noqa: E402
from harness import TARGETS  # noqa: E402

import gally  # noqa: E402,F401
from gally import chat_template, gguf_import, gguf_tokenizer, quantize, safetensors_file, tokenizer  # noqa: E402,F401

# Every function loaded so far, gally's and its dependencies' (numpy, gguf, jinja2), reports its
# branches to the fuzzer. (instrument_imports would miss gally: an editable install imports it
# through scikit-build-core's own finder.)
atheris.instrument_all()


def main() -> None:
    target, corpus, findings = sys.argv[1], sys.argv[2], sys.argv[3]
    run = TARGETS[target]
    work = tempfile.mkdtemp(prefix=f"gally-fuzz-{target}-")
    os.environ["GALLY_HOME"] = os.path.join(work, "home")
    os.makedirs(findings, exist_ok=True)

    def one_input(data: bytes) -> None:
        try:
            run(data, work)
        except Exception as e:  # noqa: BLE001 - every escape is a finding, recorded once per kind
            cause = e.__cause__ if e.__cause__ is not None else e
            frames = [f for f in traceback.extract_tb(cause.__traceback__) if "/gally/" in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "harness"
            kind = hashlib.sha1(f"{type(e).__name__} {type(cause).__name__} {where}".encode()).hexdigest()[:12]
            path = os.path.join(findings, f"{target}-{kind}")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(data)
                with open(path + ".txt", "w") as f:
                    f.write("".join(traceback.format_exception(e)))
                print(f"FINDING {path}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)

    os.makedirs(corpus, exist_ok=True)
    seeds = os.path.join(HERE, "corpus", target)
    atheris.Setup([sys.argv[0], corpus, seeds, *sys.argv[4:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
