"""The working directory's sync: a project of 300 files (30 MB) mirrored cold, then again
unchanged, kernel side (manifest) and node side (blob cache, mirror) in one process, without
the pipe. The baseline, measured in the same run, is the first (cold) sync; the second sends 0
bytes and costs a stat per file on each side.

    python benchmarks/workdir.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lepton_magic import workdir  # noqa: E402
from lepton_magic.agent.mirror import Mirror  # noqa: E402
from lepton_magic.config import Config  # noqa: E402


def make_project(root: Path) -> None:
    for i in range(300):
        folder = root / f"pkg{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{i}.bin").write_bytes(os.urandom(100_000))


def sync(project: Path, mirror: Mirror) -> tuple[float, int]:
    t0 = time.perf_counter()
    plan = workdir.plan_run(Config.defaults(), True, None, {}, [], workdir=str(project))
    need = mirror.begin("bench", plan.key, plan.files)
    sent = 0
    by_name = {}
    for name in need:
        data = plan.sources[name].read_bytes()
        by_name[name] = data
        sent += len(data)
    if need:
        mirror.receive("bench", [[n, 0] for n in need], [by_name[n] for n in need])
    mirror.materialise("bench")
    return time.perf_counter() - t0, sent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        make_project(project)
        mirror = Mirror(Path(tmp) / "node-cache")
        cold, cold_bytes = sync(project, mirror)
        warm = []
        for _ in range(5):
            seconds, sent = sync(project, mirror)
            assert sent == 0, sent
            warm.append(seconds)
        best = min(warm)
        print(f"first sync: {cold * 1e3:.1f} ms, {cold_bytes} bytes; unchanged: {best * 1e3:.1f} ms, 0 bytes")
        print(f"RATIO workdir second sync: {best / cold:.3f}x of baseline (the first sync)  (target <= 0.2)")


if __name__ == "__main__":
    main()
