"""Replays the stored fuzz corpus (tests/fuzz/corpus: seeds, and every input the fuzzer found
breaking gally, kept once fixed), one subprocess per target: each input must end in gally's answer
or a ValueError/OSError naming the file it read (tests/fuzz/harness.py) within 10 s, and the
subprocess must end by itself, with no signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz", "corpus")
TARGETS = sorted(os.listdir(CORPUS))
PER_INPUT_S = 10


def test_every_target_has_a_corpus():
    assert TARGETS == ["config", "gguf", "index", "quantized", "safetensors", "tokenizer"]


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_without_crash_or_hang(target):
    files = sorted(os.path.join(CORPUS, target, f) for f in os.listdir(os.path.join(CORPUS, target)))
    assert files
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz", "replay.py"), target, *files],
                          capture_output=True, text=True, timeout=60 + PER_INPUT_S * len(files))
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    done = [r for r in lines if "seconds" in r]
    last = lines[-1]["file"] if lines else None
    assert proc.returncode == 0, (f"{target}: exit status {proc.returncode} at input {last}: "
                                  f"{lines[-1] if lines else ''} {proc.stderr[-2000:]}")
    assert [r["file"] for r in done] == [os.path.basename(f) for f in files]
    slow = [r for r in done if r["seconds"] > PER_INPUT_S]
    assert not slow, slow
