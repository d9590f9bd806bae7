"""A gcc-built fake libnvidia-ml.so.1 and the scenario files that drive it.

`build_fake_nvml(dir, driver_535=False)` compiles `fake_nvml.c` into `dir/libnvidia-ml.so.1`
(with the right SONAME, so an in-process `ctypes.CDLL` preload also works) and returns `dir`.
Point a child process at it with `LD_LIBRARY_PATH=dir FAKE_NVML_SCENARIO=file`: the dynamic
loader reads LD_LIBRARY_PATH only at process start, which is why the end-to-end tests run the
exporter as a subprocess.

`Scenario` writes the scenario file atomically (rename), so the fake notices every rewrite.
Sample timestamps are given in seconds relative to now and written as absolute microseconds.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import time

import pytest

SRC = pathlib.Path(__file__).with_name("fake_nvml.c")

NVML_ERROR = {
    "uninitialized": 1, "not_supported": 3, "no_permission": 4, "not_found": 6, "driver_not_loaded": 9,
    "function_not_found": 13, "gpu_is_lost": 15, "lib_rm_version_mismatch": 18, "unknown": 999,
}


def build_fake_nvml(out_dir: pathlib.Path, driver_535: bool = False) -> pathlib.Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the fake libnvidia-ml.so.1")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-Wl,-soname,libnvidia-ml.so.1",
           "-o", str(out_dir / "libnvidia-ml.so.1"), str(SRC)]
    if driver_535:
        cmd.insert(1, "-DFAKE_535")
    subprocess.run(cmd, check=True, capture_output=True)
    return out_dir


@dataclasses.dataclass
class Gpu:
    index: int = 0
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    name: str = "NVIDIA GeForce RTX 3060"
    total: int = 12 * 2**30
    used: int = 3 * 2**30
    util: int = 37
    mem_util: int = 12


@dataclasses.dataclass
class Scenario:
    path: pathlib.Path
    driver: str = "550.54.15"
    gpus: list[Gpu] = dataclasses.field(default_factory=lambda: [Gpu()])
    lines: list[str] = dataclasses.field(default_factory=list)
    fails: dict[str, int] = dataclasses.field(default_factory=dict)

    def compute(self, pid: int, mem: int | None, gpu: int = 0) -> "Scenario":
        self.lines.append(f"cproc {gpu} {pid} {'NA' if mem is None else mem}")
        return self

    def graphics(self, pid: int, mem: int | None, gpu: int = 0) -> "Scenario":
        self.lines.append(f"gproc {gpu} {pid} {'NA' if mem is None else mem}")
        return self

    def sample(self, pid: int, ago: float, sm: int, mem: int = 0, enc: int = 0, dec: int = 0,
               gpu: int = 0) -> "Scenario":
        """A utilisation sample taken `ago` seconds before now."""
        ts = time.time_ns() // 1000 - int(ago * 1e6)
        self.lines.append(f"sample {gpu} {pid} {ts} {sm} {mem} {enc} {dec}")
        return self

    def fail(self, function: str, error: str | int) -> "Scenario":
        self.fails[function] = NVML_ERROR[error] if isinstance(error, str) else error
        return self

    def clear_fails(self) -> "Scenario":
        self.fails.clear()
        return self

    def text(self) -> str:
        out = [f"driver {self.driver}", f"nvml 12.{self.driver}"]
        out += [f"gpu {g.index} {g.uuid} {g.total} {g.used} {g.util} {g.mem_util} {g.name}" for g in self.gpus]
        out += self.lines
        out += [f"fail {fn} {code}" for fn, code in self.fails.items()]
        return "\n".join(out) + "\n"

    def write(self) -> "Scenario":
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.text())
        os.replace(tmp, self.path)
        return self


def env_for(lib_dir: pathlib.Path | None, scenario: Scenario | pathlib.Path) -> dict[str, str]:
    path = scenario.path if isinstance(scenario, Scenario) else scenario
    env = {"FAKE_NVML_SCENARIO": str(path)}
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = str(lib_dir)
    return env


# --- real cgroups for attribution tests ----------------------------------------------------------

def cgroup2_mount() -> pathlib.Path | None:
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"] and left.split()[3] == "/":
            return pathlib.Path(left.split()[4])
    return None


class CgroupTree:
    """Cgroups created under the cgroup2 mount inside a private top directory, with processes
    moved into them. `close()` kills the processes it started and removes every cgroup bottom-up,
    also after a failed test."""

    def __init__(self, name: str) -> None:
        mount = cgroup2_mount()
        if mount is None or not os.access(mount, os.W_OK):
            pytest.skip("needs a writable cgroup2 mount (run as root)")
        self.mount = mount
        self.top = mount / name
        self.top.mkdir()
        self.procs: list[subprocess.Popen] = []

    def path(self, rel: str) -> str:
        """The cgroup path as /proc/<pid>/cgroup shows it."""
        return "/" + str((self.top / rel).relative_to(self.mount))

    def spawn(self, rel: str, argv: list[str] | None = None, nice: int = 0, memlock: int | None = None) -> int:
        d = self.top / rel
        d.mkdir(parents=True, exist_ok=True)

        def pre() -> None:  # runs in the child before exec: join the cgroup, set the tuning
            (d / "cgroup.procs").write_text(str(os.getpid()))
            if nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            if memlock is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))

        p = subprocess.Popen(argv or ["sleep", "300"], preexec_fn=pre, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p.pid

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        dirs = sorted((d for d in self.top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
        for d in [*dirs, self.top]:
            for _ in range(50):  # a killed process leaves its cgroup a moment after wait()
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)

    def __enter__(self) -> "CgroupTree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
