"""What a result was measured on: the CPU, its instruction sets, the memory, gally's commit."""

from __future__ import annotations

import os
import platform
import subprocess

# CPU flags that decide which kernels can run, as /proc/cpuinfo spells them
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu() -> dict:
    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(), "flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["model"] = fields.get("model name", info["model"])
    if "cpu family" in fields:
        info["family_model"] = f"family {fields['cpu family']} model {fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    info["flags"] = [f for f in ISA_FLAGS if f in flags]
    return info


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit() -> str:
    """The commit of the tree gally was imported from, '+dirty' when tracked files differ from it;
    'unknown' for an installed wheel. GALLY_COMMIT, when set, names it instead (a copy of the tree
    without its git folder, built elsewhere: bench/scaling.sh)."""
    import gally

    if os.environ.get("GALLY_COMMIT"):
        return os.environ["GALLY_COMMIT"]

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(gally.__file__))))

    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def describe() -> dict:
    import gally

    return {"cpu": cpu(), "memory_gib": memory_gib(), "gally": gally.info(), "commit": git_commit(),
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}
