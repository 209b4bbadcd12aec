"""The official implementation timed beside ours (`profile.official=true`, `make bench-cpu-official`): one timing
server per cell, started in the reference environment, asked for one end-to-end call after each of our timed
end_to_end iterations (interleaved: the two never run at once, and both see the machine of the same moment).

The reference environment is the folder `bench/official/reference_env/setup_reference_env.sh WORKDIR` makes (the
script and the package freeze it installs are copies of the ones the golden fixtures were made with): WORKDIR/venv
(torch, detectron2's and the official code's dependencies), WORKDIR/detectron2 and WORKDIR/official (source trees
at the commits the model config names). `profile.official_env` (or the environment variable OVSEG_REFERENCE_ENV) points
at it. The model config's `official` block says which server script runs the model (a file in this folder) and
with which official config file; a model without one, a missing environment or an unsupported precision is
skipped with the reason in the record (`official_skipped`), never an error: the cell's own figures still count.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench import BenchError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENV_VAR = "OVSEG_REFERENCE_ENV"
# our precision -> how the official code runs (its own code has no pure-bf16 path: CPU autocast, as in the issue)
PRECISIONS = {"fp32": "fp32", "bf16": "autocast_bf16", "amp_bf16": "autocast_bf16"}
SETUP_HINT = ("make it with bench/official/reference_env/setup_reference_env.sh WORKDIR (see the README, "
              "'Official code beside ours') and set profile.official_env=WORKDIR")


def reference_env(setting: str | None) -> Path | None:
    value = setting or os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else None


def skip_reason(spec: dict, env: Path | None, precision: str) -> str | None:
    """Why the official code cannot be timed for this cell, or None when it can."""
    if not spec or not spec.get("script"):
        return "the model config has no `official` block (no official implementation to time)"
    if precision not in PRECISIONS:
        return f"precision={precision}: the official code is timed in fp32 and bf16 autocast only"
    if env is None:
        return f"no reference environment given; {SETUP_HINT}"
    for part in ("venv/bin/python", "detectron2", "official"):
        if not (env / part).exists():
            return f"reference environment {env} has no {part}; {SETUP_HINT}"
    return None


class OfficialTimer:
    """A running timing server: `call()` times one official end-to-end call (ms, measured by the server around
    the call alone); `times` keeps them. Use as a context manager: the server is stopped on exit."""

    def __init__(self, spec: dict, env: Path, precision: str, threads: int, image: np.ndarray, names: list[str]):
        self.spec, self.env, self.precision = spec, env, PRECISIONS[precision]
        self.threads, self.image, self.names = threads, image, names
        self.python = str(env / "venv" / "bin" / "python")
        self.times: list[float] = []
        self.built = ""
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def command(self, folder: Path) -> list[str]:
        np.save(folder / "image.npy", self.image)
        (folder / "vocabulary.txt").write_text("\n".join(self.names) + "\n", encoding="utf-8")
        return [self.python, str(HERE / self.spec["script"]), "--config", self.spec["config"],
                "--source", str(self.env / "official"), "--image", str(folder / "image.npy"),
                "--vocabulary", str(folder / "vocabulary.txt"), "--precision", self.precision,
                "--threads", str(self.threads), "--fill", str(ROOT / "bench" / "testing" / "fills.py"),
                "--fill-family", self.spec.get("fill", "san")]

    def __enter__(self) -> "OfficialTimer":
        self._tmp = tempfile.TemporaryDirectory(prefix="ovseg_official_")
        folder = Path(self._tmp.name)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(self.env / "detectron2"),
                                                            str(self.env / "official")]),
               "OMP_NUM_THREADS": str(self.threads), "WANDB_MODE": "disabled"}
        self._log = open(folder / "server.log", "w+")
        self._proc = subprocess.Popen(self.command(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, env=env, cwd=str(folder))
        line = self._proc.stdout.readline()
        if not line.startswith("ready"):
            self.__exit__(None, None, None, failed=True)
        self.built = line[len("ready"):].strip()
        return self

    def call(self) -> float:
        self._proc.stdin.write("t\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        try:
            ms = float(line)
        except ValueError:
            self.__exit__(None, None, None, failed=True)
        self.times.append(ms)
        return ms

    def warm_up(self, n: int) -> None:
        """Untimed calls (the first encodes the vocabulary into the official per-word cache)."""
        for _ in range(max(n, 1)):
            self.call()
        self.times.clear()

    def __exit__(self, *exc, failed: bool = False) -> None:
        tail = ""
        if self._proc is not None:
            if self._proc.poll() is None and self._proc.stdin:
                try:
                    self._proc.stdin.write("q\n")
                    self._proc.stdin.close()
                except OSError:
                    pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._log.seek(0)
            tail = " | ".join(ln.strip() for ln in self._log.read().splitlines()[-3:])
            self._log.close()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if failed:
            script = HERE / self.spec.get("script", "")
            raise BenchError(f"the official timing server ({script.name} in {self.env}) stopped: "
                             f"{tail or 'no output'}; {script} says how it runs (run it by hand to see more)")

    def figures(self, ours_ms: list[float]) -> dict:
        """official_ms (median of the interleaved calls) and ours_over_official (our end_to_end median over it)."""
        official = statistics.median(self.times)
        return {"official_ms": official, "official_ms_min": min(self.times), "official_iters": len(self.times),
                "ours_over_official": statistics.median(ours_ms) / official,
                "official_precision": self.precision, "official_source": self.spec.get("source", ""),
                "official_built": self.built}
