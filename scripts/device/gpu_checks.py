#!/usr/bin/env python
"""Issue 8's GPU checks as one prepared run for a lent GPU machine: benchmarks and tests, in order
of importance, each under its own time limit, all under one budget, every result kept as it lands.

A lent machine gives a session minutes, not hours (15 in all, a minute or two of it to start), and
nothing installed survives it. So this driver, which needs only the standard library:

1. installs the wheels carried in ``--wheels`` (made here by ``scripts/device/fetch_wheels.sh``: the
   packages the machine's preinstalled torch lacks) into a private folder on ``PYTHONPATH``;
2. runs the plan's steps in order. A step gets ``min(its limit, what is left of --budget)``; one
   that cannot get its minimum is skipped, one that overruns is killed with its whole process group
   (DataLoader workers included), and a failing step never stops the next;
3. after every step, and every ``PACK_EVERY_S`` seconds while one runs, packs the results (each
   benchmark's JSON, which the benchmarks rewrite after every row, each step's log, ``summary.json``)
   into ``OUT/results.tar.gz``, so a call cut short still returns what was measured; on SIGTERM it
   stops the running step, records it as ``terminated`` and packs once more;
4. prints the step table and the benchmark rows last, where the device tool's output tail shows them.

A wheel install that fails is recorded (``install_error`` in ``summary.json``) and the steps still run.
The GPU tests run as two steps, the xFormers-marked ones apart: an xFormers built for another torch
or CUDA may crash the process in its kernels, and must not take the other GPU tests' results with it.

Plans: ``core`` (environment and ceilings, ViT-L/16 step per backend, GPU tests, xFormers tests,
attention, data path with and without GPU augmentation), ``more`` (the original implementation's ViT-L/16 step,
compile, ViT-L/14, ViT-g/14, the whole suite), ``smoke`` (a CPU rehearsal of the driver with the
quickstart config and of scripts/device/benchmark_original.py, for this machine).

    python3 scripts/device/gpu_checks.py --plan core --budget 330       # on the device, OUT set
    python scripts/device/gpu_checks.py --plan smoke --out /tmp/rehearsal   # here, on CPU

docs/performance.md ("Running the GPU checks") gives the device tool calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = Path(tempfile.gettempdir()) / "dinov2_device_site"
PACK_EVERY_S = 30.0  # while a step runs, its results so far are packed this often


class Terminated(Exception):
    """The driver got SIGTERM (the device call's time limit): stop the running step, keep the results."""


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: float  # at most this long
    command: str  # shell words; "{py}", "{res}" and "{jpegs}" are filled in when the step runs
    min_s: float = 20.0  # skipped when less than this is left of the budget

    def argv(self, values: dict[str, str]) -> list[str]:
        return [word.format(**values) for word in shlex.split(self.command)]


def benchmark(script: str, name: str, limit: float, args: str, min_s: float) -> Step:
    """A step running ``script`` with ``args``, writing ``{res}/<name>.json``."""
    return Step(name, limit, f"{{py}} {script} {args} --output {{res}}/{name}.json", min_s)


def train(name: str, limit: float, args: str, min_s: float = 60.0) -> Step:
    """A scripts/benchmark_train.py step."""
    return benchmark("scripts/benchmark_train.py", name, limit, args, min_s)


def original(name: str, limit: float, args: str, min_s: float) -> Step:
    """A scripts/device/benchmark_original.py step: the original implementation (its wheel from
    fetch_wheels.sh) with its own vitl16_short preset."""
    return benchmark("scripts/device/benchmark_original.py", name, limit,
                     f"--source .whl/original --config vitl16_short {args}", min_s)  # fmt: skip


# 500 x 375 JPEGs (ImageNet's typical size) from scripts/benchmark_data.py, written by N processes.
JPEGS = (
    '{py} -c "import sys; from concurrent.futures import ProcessPoolExecutor as P; from pathlib import Path; '
    "sys.path.insert(0, 'scripts'); from benchmark_data import write_jpegs; "
    "root, parts, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); "
    "dirs = [root / f'part{{k:02d}}' for k in range(parts)]; [d.mkdir(parents=True, exist_ok=True) for d in dirs]; "
    "pool = P(parts); list(pool.map(write_jpegs, dirs, [per] * parts, [(500, 375)] * parts, range(parts))); "
    "pool.shutdown(); "
    "print(sum(1 for _ in root.rglob('*.jpg')), 'JPEGs in', root)\" {jpegs}"
)
VITL16 = "--config vitl16_short --batch-size 64"
FOLDER = "train.dataset_path=ImageFolder:root={jpegs}"
ENV = "{py} scripts/device/env_check.py --output {res}/env.json"
ATTENTION = (
    "{py} scripts/benchmark_attention.py --archs vit_large --patch-size 16 --global-size 224 --local-size 96 "
    "--batch-sizes 64 --dtypes bf16 --modes forward_backward --backends math sdpa varlen xformers --iters 20 "
    "--output {res}/attention_vitl16.json"
)
# -v: each test's name and outcome reach the log as it finishes, which is all that is left of a run
# killed at its limit or crashed by a kernel (the JUnit XML is written at the end).
# --continue-on-collection-errors: a test module that does not import on the machine's image must not
# stop every other test. The xFormers-marked tests run in a step of their own (see the docstring); the
# other GPU tests run with xFormers switched off (dinov2.ops.xformers.DISABLE_VARIABLE), so that they
# test the native paths (``auto``, the residual add) and no xFormers kernel runs in their process.
PYTEST = "{py} -m pytest -p no:cacheprovider --continue-on-collection-errors"
GPU_TESTS = (
    f"env DINOV2_DISABLE_XFORMERS=1 {PYTEST} -v -m 'gpu and not xformers' --junitxml {{res}}/gpu_tests.xml tests"
)
XFORMERS_TESTS = f"{PYTEST} -v -m xformers --junitxml {{res}}/xformers_tests.xml tests"
SUITE = f"{PYTEST} -q -n 8 --junitxml {{res}}/suite.xml tests"

PLANS: dict[str, tuple[Step, ...]] = {
    "core": (
        Step("env", 90, ENV),
        # The headline figure first: with the budget spent, later steps are the ones skipped.
        train("train_vitl16", 240, f"{VITL16} --backends sdpa varlen xformers --warmup 3 --iters 10"),
        Step("gpu_tests", 180, GPU_TESTS, min_s=60),
        Step("xformers_tests", 120, XFORMERS_TESTS, min_s=40),
        Step("attention_vitl16", 90, ATTENTION),
        Step("jpegs", 60, f"{JPEGS} 16 256"),
        train(
            "data_gpu_aug_vitl16",
            120,
            f"{VITL16} --mode data --num-workers 8 15 --iters 15 train.gpu_augmentation=true {FOLDER}",
            min_s=40,
        ),  # fmt: skip
        train("data_cpu_aug_vitl16", 90, f"{VITL16} --mode data --num-workers 15 --iters 15 {FOLDER}", min_s=40),
    ),
    "more": (
        original("original_vitl16", 240, "--batch-size 64 --warmup 3 --iters 10", min_s=90),
        train(
            "train_vitl16_compile",
            300,
            f"{VITL16} --backends xformers sdpa --compile true --warmup 4 --iters 10",
            min_s=120,
        ),  # fmt: skip
        train("train_vitl14", 150, "--config vitl14 --batch-size 32 --backends xformers sdpa --warmup 3 --iters 10"),
        train(
            "train_vitg14",
            240,
            "--config vitg14 --batch-size 32 --backends xformers "
            "--activation-checkpointing off selective --warmup 2 --iters 6",
            min_s=90,
        ),  # fmt: skip
        Step("suite", 300, SUITE, min_s=120),
    ),
    "smoke": (
        Step("env", 60, ENV),
        train(
            "train_quickstart",
            120,
            "--batch-size 4 --backends sdpa --warmup 1 --iters 1 --num-batches 1 --device cpu student.depth=2",
            min_s=10,
        ),  # fmt: skip
        original("original_rehearsal", 120, "--cpu-rehearsal --warmup 1 --iters 1", min_s=10),
        Step("jpegs", 60, f"{JPEGS} 2 8", min_s=5),
        train(
            "data_gpu_aug_quickstart",
            60,
            "--mode data --batch-size 4 --num-workers 0 --warmup 0 --iters 2 "
            f"--device cpu train.gpu_augmentation=true {FOLDER}",
            min_s=5,
        ),  # fmt: skip
    ),
}


# ---------------------------------------------------------------------------------------------- running
def install_wheels(wheels: Path, python: str) -> tuple[str | None, list[str]]:
    """pip-install every wheel in ``wheels`` (no index, no dependencies) into :data:`SITE`. Returns
    the folder for PYTHONPATH (None when there are no wheels) and the folders of shared libraries
    they brought (NVIDIA runtime wheels) for LD_LIBRARY_PATH."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None, []
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(SITE), *map(str, found)]  # fmt: skip
    subprocess.run(cmd, check=True)
    # NVIDIA's CUDA 12 runtime wheel ships nvidia/__init__.py: first on PYTHONPATH, that regular package
    # would hide the image's own nvidia.* packages (torch's CUDA 13 libraries). Without it, ours is a
    # namespace portion and the image's still import; the libraries reach the steps by LD_LIBRARY_PATH.
    (SITE / "nvidia" / "__init__.py").unlink(missing_ok=True)
    print(f"installed {len(found)} wheels into {SITE}: {', '.join(w.name.split('-')[0] for w in found)}")
    return installed()


def installed() -> tuple[str | None, list[str]]:
    """What :func:`install_wheels` returns, for whatever is in :data:`SITE` (also after a failed install)."""
    libs = sorted({str(lib.parent) for lib in (SITE / "nvidia").glob("*/lib/*.so*")})
    return (str(SITE) if SITE.is_dir() else None), libs


def run_step(step: Step, argv: list[str], timeout: float, log: Path, env: dict[str, str], tick=None,
             tick_s: float = PACK_EVERY_S) -> dict:  # fmt: skip
    """Run one step in its own process group, its output both printed and logged; kill the whole
    group when it overruns ``timeout`` (or when the driver is stopped while it runs). ``tick()`` is
    called every ``tick_s`` seconds while it runs. Returns its record: status ok / failed / timeout."""
    start = time.monotonic()
    with log.open("w") as handle:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")  # fmt: skip

        def copy() -> None:  # a thread, so that the time limit holds while the step is silent
            for line in proc.stdout:
                handle.write(line)
                sys.stdout.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        timed_out = False
        try:
            while True:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    timed_out = True
                    break
                try:
                    proc.wait(timeout=min(left, tick_s))
                    break
                except subprocess.TimeoutExpired:
                    if tick is not None and time.monotonic() - start < timeout:
                        handle.flush()
                        tick(time.monotonic() - start)
        finally:
            if proc.poll() is None:  # overran, or the driver is being stopped
                os.killpg(proc.pid, signal.SIGKILL)  # the step and everything it started
                proc.wait()
            reader.join(timeout=10)
    sys.stdout.flush()
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    return {"step": step.name, "status": status, "rc": proc.returncode, "seconds": time.monotonic() - start,
            "limit_s": timeout, "command": argv}  # fmt: skip


def pack(results: Path, out: Path, summary: dict) -> None:
    """``summary.json`` into the results, then the results folder as ``out/results.tar.gz``."""
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(results, arcname="results")
    partial.replace(out / "results.tar.gz")


def run_plan(steps: tuple[Step, ...], budget: float, results: Path, out: Path, env: dict[str, str],
             values: dict[str, str], extra: dict | None = None, tick_s: float = PACK_EVERY_S) -> dict:  # fmt: skip
    """Every step in order under ``budget`` seconds; the summary of what ran (``extra`` merged in).
    On :class:`Terminated` the running step is recorded as ``terminated``, the results are packed
    and the exception goes on."""
    deadline = time.monotonic() + budget
    summary = {"budget_s": budget, **(extra or {}), "steps": []}
    for step in steps:
        left = deadline - time.monotonic()
        if left < step.min_s:
            record = {"step": step.name, "status": "skipped", "reason": f"{left:.0f} s left, needs {step.min_s:.0f}"}
        else:
            print(f"\n=== {step.name} (up to {min(step.limit_s, left):.0f} s)", flush=True)
            argv = step.argv(values)

            def tick(seconds: float, name: str = step.name) -> None:  # the step's results so far
                running = {"step": name, "status": "running", "seconds": seconds}
                pack(results, out, {**summary, "steps": [*summary["steps"], running]})

            try:
                record = run_step(step, argv, min(step.limit_s, left), results / f"{step.name}.log", env, tick,
                                  tick_s)  # fmt: skip
            except Terminated as stop:
                summary["steps"].append({"step": step.name, "status": "terminated", "reason": str(stop)})
                summary["terminated"] = True
                pack(results, out, summary)
                raise
        summary["steps"].append(record)
        pack(results, out, summary)
    return summary


# ---------------------------------------------------------------------------------------------- report
def benchmark_row(stem: str, row: dict) -> str | None:
    """One benchmark row as a line of the summary (None for a kind of row it does not know)."""
    if "error" in row:
        return f"{stem}: {row.get('backend', row.get('num_workers'))} ERROR {row['error']}"
    if "s_iter_median" in row:
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
        nominal = f"{100 * row['mfu_nominal']:.1f}%" if row.get("mfu_nominal") is not None else "n/a"
        reserved = f" (reserved {row['peak_reserved_mib'] / 1024:.1f})" if row.get("peak_reserved_mib") else ""
        return (f"{stem}: {row['backend']} compile={row['compile']} ckpt={row['activation_checkpointing']} "
                f"batch={row['batch_size']} {row['img_s']:.1f} img/s  MFU {mfu} (nominal {nominal})  "
                f"peak {row['peak_mem_mib'] / 1024:.1f} GiB{reserved}")  # fmt: skip
    if "num_workers" in row:
        return f"{stem}: workers={row['num_workers']} {row['img_s']:.1f} img/s gpu_aug={row['gpu_augmentation']}"
    if "median_ms" in row:
        return (
            f"{stem}: {row['backend']} {row['mode']} {row['median_ms']:.2f} ms peak {row['peak_mem_mib'] or 0:.0f} MiB"
        )
    return None


def benchmark_rows(results: Path) -> list[str]:
    """One line per benchmark row in the results (train steps, data path, attention)."""
    lines = []
    for path in sorted(results.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for row in report.get("rows", []) if isinstance(report, dict) else []:
            try:
                line = benchmark_row(path.stem, row)
            except (KeyError, TypeError, ValueError) as error:  # the table must not cost the summary
                line = f"{path.stem}: a row this table cannot show ({type(error).__name__}: {error})"
            if line is not None:
                lines.append(line)
    return lines


def print_summary(summary: dict, results: Path) -> None:
    print("\n=== steps")
    if "install_error" in summary:
        print(f"installing the wheels failed: {summary['install_error']}")
    for record in summary["steps"]:
        took = f"{record['seconds']:.0f} s" if "seconds" in record else record.get("reason", "")
        print(f"{record['step']:>24}  {record['status']:<8} {took}")
    print("=== benchmark rows")
    for line in benchmark_rows(results):
        print(line)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), default="core")
    p.add_argument("--only", nargs="+", help="run just these steps of the plan, in the plan's order")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole plan")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "runs" / "device")))
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    steps = PLANS[args.plan]
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in steps})
        if unknown:
            p.error(f"--only: no step {', '.join(unknown)} in plan {args.plan!r} ({', '.join(s.name for s in steps)})")
        steps = tuple(s for s in steps if s.name in args.only)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    extra = {"plan": args.plan}
    try:
        site, libs = install_wheels(args.wheels, args.python)
    except (OSError, subprocess.CalledProcessError) as error:  # the steps still run, and say what is missing
        site, libs = installed()  # what got in before the failure
        extra["install_error"] = f"{type(error).__name__}: {error}"
        print(f"installing the wheels failed: {extra['install_error']}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, str(REPO), os.environ.get("PYTHONPATH")]))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, os.environ.get("LD_LIBRARY_PATH")]))
    results = Path(tempfile.mkdtemp(prefix=f"gpu_checks_{args.plan}_"))
    values = {"py": args.python, "res": str(results), "jpegs": str(results.parent / "dinov2_device_jpegs")}

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the results are being packed
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        summary = run_plan(steps, args.budget, results, args.out, env, values, extra)
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (already, when the signal raised it) the packing below
        try:  # as written when it stopped
            summary = json.loads((results / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            summary = {**extra, "steps": []}
        summary["terminated"] = True
        pack(results, args.out, summary)  # again: the signal may have cut the packing after a finished step
        print_summary(summary, results)
        raise SystemExit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    pack(results, args.out, summary)
    print_summary(summary, results)
    return summary


if __name__ == "__main__":
    main()
