"""scripts/device/gpu_checks.py, the prepared run for a lent GPU: time limits, the budget, kept results,
and that every planned benchmark command parses and names configs that load (a typo found on the
GPU machine costs device minutes; found here it costs nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def checks(script):
    return script("device/gpu_checks.py", "gpu_checks")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())  # a zombie is dead


def test_steps_run_in_order_under_limits_and_budget(checks, tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    # A step that starts a child (as a DataLoader does) and then hangs: the whole group must die.
    hang = ("{py} -c \"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(120)']); open(sys.argv[1], 'w').write(str(child.pid)); print('started', "
            "flush=True); time.sleep(120)\" {res}/child.pid")  # fmt: skip
    steps = (
        checks.Step("hangs", 3, hang, min_s=1),
        checks.Step("fails", 30, "{py} -c \"import sys; print('bad input'); sys.exit(3)\"", min_s=1),
        checks.Step("passes", 30, "{py} -c \"print('fine')\"", min_s=1),
        checks.Step("too_big", 30, "{py} -c \"print('never')\"", min_s=1000),
    )
    start = time.monotonic()
    summary = checks.run_plan(steps, 60, results, out, dict(os.environ), {"py": sys.executable, "res": str(results)})
    assert time.monotonic() - start < 30  # the hanging step was cut at its 3 s limit
    by_name = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == ["hangs", "fails", "passes", "too_big"]
    assert by_name["hangs"]["status"] == "timeout" and 3 <= by_name["hangs"]["seconds"] < 15
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["rc"] == 3
    assert by_name["passes"]["status"] == "ok" and by_name["passes"]["rc"] == 0
    assert by_name["too_big"]["status"] == "skipped" and "needs 1000" in by_name["too_big"]["reason"]
    child = int((results / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the hanging step's child outlived the time limit"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"results/hangs.log", "results/fails.log", "results/passes.log", "results/summary.json"} <= names
        assert tar.extractfile("results/fails.log").read().decode().strip() == "bad input"
        packed = json.loads(tar.extractfile("results/summary.json").read())
    assert [s["status"] for s in packed["steps"]] == ["timeout", "failed", "ok", "skipped"]


def test_the_budget_is_shared_by_the_steps(checks, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    sleep = '{py} -c "import time; time.sleep(30)"'
    steps = (checks.Step("first", 100, sleep, min_s=1), checks.Step("second", 100, sleep, min_s=3))
    summary = checks.run_plan(steps, 4, results, tmp_path / "out", dict(os.environ), {"py": sys.executable})
    first, second = summary["steps"]
    assert first["status"] == "timeout" and first["limit_s"] <= 4  # capped by the budget, not its own 100 s
    assert second["status"] == "skipped"


def test_every_planned_benchmark_parses_and_its_config_loads(checks, script, tmp_path):
    bench_train = script("benchmark_train.py", "benchmark_train_for_plans")
    bench_attention = script("benchmark_attention.py", "benchmark_attention_for_plans")
    bench_original = script("device/benchmark_original.py", "benchmark_original_for_plans")
    fetch = (SCRIPTS / "device" / "fetch_wheels.sh").read_text()
    values = {"py": "python", "res": str(tmp_path), "jpegs": str(tmp_path / "jpegs")}
    seen = set()
    for plan, steps in checks.PLANS.items():
        assert len({s.name for s in steps}) == len(steps), f"plan {plan}: step names repeat"
        for step in steps:
            argv = step.argv(values)
            script = argv[1]
            if script.endswith(".py"):
                assert (SCRIPTS.parent / script).is_file(), f"{plan}/{step.name}: no {script}"
            if script == "scripts/benchmark_train.py":
                args = bench_train.parse_args(argv[2:])
                cfg = bench_train.load_benchmark_config(args)  # unknown override keys raise here
                assert args.output == Path(tmp_path / f"{step.name}.json")
                seen.add(args.config)
                if "train.gpu_augmentation=true" in argv:
                    assert cfg.train.gpu_augmentation is True
            elif script == "scripts/device/benchmark_original.py":
                args = bench_original.parse_args(argv[2:])
                assert args.output == Path(tmp_path / f"{step.name}.json")
                # the wheel is where fetch_wheels.sh puts it, relative to the repository as the step runs
                assert args.source == Path(".whl/original") and 'download -d "$dest/original"' in fetch
                assert "dest=.whl" in fetch
                # the original's preset is our config of the same name, for the settings it makes
                ours = bench_train.load_benchmark_config(bench_train.parse_args(["--config", args.config]))
                for setting in bench_original.PRESETS[args.config]:
                    key, value = setting.split("=")
                    section, name = key.split(".")
                    assert str(ours[section][name]) == value, f"{step.name}: ours has {key}={ours[section][name]}"
                seen.add("original")
            elif script == "scripts/benchmark_attention.py":
                args = bench_attention.parse_args(argv[2:])
                assert "xformers" in args.backends and args.dtypes == ["bf16"]
    assert {"vitl16_short", "vitl14", "vitg14", "quickstart", "original"} <= seen


def test_only_picks_steps_and_names_unknown_ones(checks, tmp_path, capsys):
    with pytest.raises(SystemExit):
        checks.main(["--plan", "smoke", "--only", "no_such_step", "--out", str(tmp_path)])
    assert "no step no_such_step in plan 'smoke'" in capsys.readouterr().err


def _collected(expression: str, *paths: str) -> set[str]:
    """Test ids that ``pytest -m expression`` selects under ``paths`` (collection only)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", expression, *paths],
        cwd=SCRIPTS.parent, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {line.strip() for line in out.stdout.splitlines() if "::" in line}


def test_the_test_steps_split_the_gpu_tests_and_keep_the_cuda_cases(checks):
    """The core plan's two pytest steps together select every GPU or xFormers test, none twice, with
    every xFormers case (also a parameter of a GPU test) in the xFormers step; the CUDA cases of the
    cross-entropy tests are among them (they used to be plain parameters that only the suite ran)."""
    steps = {s.name: s for s in checks.PLANS["core"]}
    expressions, argvs = {}, {}
    for name in ("gpu_tests", "xformers_tests"):
        argv = argvs[name] = steps[name].argv({"py": "python", "res": "/tmp"})
        assert "--continue-on-collection-errors" in argv  # one module that fails to import stops nothing
        expressions[name] = argv[len(argv) - argv[::-1].index("-m")]  # the last -m: the marker expression
    # the native GPU tests run with xFormers switched off, the xFormers tests with it on
    assert argvs["gpu_tests"][:2] == ["env", "DINOV2_DISABLE_XFORMERS=1"]
    assert not any("DINOV2_DISABLE_XFORMERS" in word for word in argvs["xformers_tests"])
    paths = ("tests/ops",)
    gpu, xformers = (_collected(expressions[name], *paths) for name in ("gpu_tests", "xformers_tests"))
    assert not gpu & xformers
    assert gpu | xformers == _collected("gpu or xformers", *paths)
    assert any("test_cross_entropy.py" in t and "cuda" in t for t in gpu)
    assert not any("xformers" in t for t in gpu), sorted(t for t in gpu if "xformers" in t)
    assert (
        "tests/ops/test_attention.py::test_nested_backends_agree_in_bf16_on_cuda_forward_and_backward[xformers]"
        in xformers
    )


def test_a_running_step_is_packed_while_it_runs(checks, tmp_path):
    """A call cut short in the middle of a long step still returns the rows the step has written."""
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    slow = ("{py} -c \"import time; open('{res}/rows.json', 'w').write('[1]'); print('row 1', flush=True); "
            "time.sleep(3)\"")  # fmt: skip
    seen = {}
    step = checks.Step("slow", 30, slow, min_s=1)

    def look() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "summary" not in seen:
            try:
                with tarfile.open(out / "results.tar.gz") as tar:
                    summary = json.loads(tar.extractfile("results/summary.json").read())
                    if summary["steps"] and summary["steps"][-1]["status"] == "running":
                        rows = tar.extractfile("results/rows.json").read().decode()
                        log = tar.extractfile("results/slow.log").read().decode()
                        seen.update(summary=summary, rows=rows, log=log)
            except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=look)
    watcher.start()
    summary = checks.run_plan((step,), 60, results, out, dict(os.environ),
                              {"py": sys.executable, "res": str(results)}, tick_s=0.5)  # fmt: skip
    watcher.join()
    assert summary["steps"][0]["status"] == "ok"
    assert "summary" in seen, "nothing was packed while the step ran"
    assert seen["summary"]["steps"] == [
        {"step": "slow", "status": "running", "seconds": seen["summary"]["steps"][0]["seconds"]}
    ]
    assert seen["rows"] == "[1]" and seen["log"].strip() == "row 1"


def test_sigterm_stops_the_step_and_keeps_the_results(tmp_path):
    """The device call's limit may end the driver with SIGTERM: the running step (and its children)
    stop, it is recorded as terminated, and the results are packed once more."""
    out, wheels = tmp_path / "out", tmp_path / "no_wheels"
    driver = f"""
import sys, time
sys.path.insert(0, {str(SCRIPTS / "device")!r})
import gpu_checks
gpu_checks.PLANS["test"] = (
    gpu_checks.Step("first", 30, "{{py}} -c \\"print('first done')\\"", min_s=1),
    gpu_checks.Step("hangs", 60, "{{py}} -c \\"import time; print('hanging', flush=True); time.sleep(60)\\"", min_s=1),
    gpu_checks.Step("never", 30, "{{py}} -c \\"print('never')\\"", min_s=1),
)
gpu_checks.main(["--plan", "test", "--out", {str(out)!r}, "--wheels", {str(wheels)!r}, "--budget", "100"])
"""
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    for line in proc.stdout:  # wait until the second step runs
        if "hanging" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, rest
    with tarfile.open(out / "results.tar.gz") as tar:
        summary = json.loads(tar.extractfile("results/summary.json").read())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("first", "ok"), ("hangs", "terminated")]
    assert summary["terminated"] is True and summary["plan"] == "test"
    assert "terminated" in rest and "never" not in rest


def test_a_failed_wheel_install_is_recorded_and_the_steps_still_run(checks, tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(checks, "SITE", tmp_path / "site")
    monkeypatch.setitem(checks.PLANS, "test", (checks.Step("passes", 30, "{py} -c \"print('fine')\"", min_s=1),))
    summary = checks.main(["--plan", "test", "--out", str(tmp_path / "out"), "--wheels", str(wheels)])
    assert "CalledProcessError" in summary["install_error"]
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("passes", "ok")]
    assert "installing the wheels failed" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "install_error" in json.loads(tar.extractfile("results/summary.json").read())


def test_the_summary_shows_every_kind_of_row(checks, tmp_path, capsys):
    """The table printed last (all that the device call's output tail may show): a CUDA training row
    with its MFU and both memory peaks, a row without FLOPs, a failed row, a data row, an attention row
    and the original's row; files that are not benchmark reports are passed over."""
    train = {"backend": "xformers", "compile": "false", "activation_checkpointing": "off", "batch_size": 64,
             "s_iter_median": 0.2, "img_s": 320.0, "mfu": 0.3712, "mfu_nominal": 0.4967,
             "peak_mem_mib": 30 * 1024, "peak_reserved_mib": 34 * 1024}  # fmt: skip
    no_flops = train | {"backend": "sdpa", "mfu": None, "mfu_nominal": None, "peak_reserved_mib": None}
    failed = {
        "backend": "varlen",
        "compile": "false",
        "activation_checkpointing": "off",
        "error": "OutOfMemoryError: x",
    }
    original = train | {"backend": "original", "compile": "off", "mfu": None, "mfu_nominal": None}
    reports = {
        "train_vitl16": [train, no_flops, failed],
        "data_gpu_aug_vitl16": [{"num_workers": 8, "img_s": 1234.5, "gpu_augmentation": True}],
        "attention_vitl16": [{"backend": "sdpa", "mode": "forward_backward", "median_ms": 12.345, "peak_mem_mib": None}],
        "original_vitl16": [original],
    }  # fmt: skip
    for stem, rows in reports.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    (tmp_path / "broken.json").write_text("{")
    summary = {
        "steps": [
            {"step": "env", "status": "ok", "seconds": 12.0},
            {"step": "suite", "status": "skipped", "reason": "40 s left, needs 120"},
        ]
    }
    checks.print_summary(summary, tmp_path)
    out = capsys.readouterr().out.splitlines()
    rows = out[out.index("=== benchmark rows") + 1 :]
    assert rows == [
        "attention_vitl16: sdpa forward_backward 12.35 ms peak 0 MiB",
        "data_gpu_aug_vitl16: workers=8 1234.5 img/s gpu_aug=True",
        "original_vitl16: original compile=off ckpt=off batch=64 320.0 img/s  MFU n/a (nominal n/a)  "
        "peak 30.0 GiB (reserved 34.0)",
        "train_vitl16: xformers compile=false ckpt=off batch=64 320.0 img/s  MFU 37.1% (nominal 49.7%)  "
        "peak 30.0 GiB (reserved 34.0)",
        "train_vitl16: sdpa compile=false ckpt=off batch=64 320.0 img/s  MFU n/a (nominal n/a)  peak 30.0 GiB",
        "train_vitl16: varlen ERROR OutOfMemoryError: x",
    ]
    assert any("env" in line and "ok" in line and "12 s" in line for line in out)
    assert any("suite" in line and "skipped" in line and "needs 120" in line for line in out)


def test_carried_nvidia_wheel_does_not_hide_the_images_nvidia_packages(checks, tmp_path, monkeypatch):
    # A wheel shaped like nvidia-cuda-runtime-cu12 (nvidia/__init__.py + nvidia/cuda_runtime/lib/*.so)
    # and an "image" site with its own nvidia.cu13 package, as torch's CUDA 13 wheels install it.
    import zipfile

    wheel = tmp_path / "wheels" / "nvidia_fake_cu12-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    dist = "nvidia_fake_cu12-1.0.dist-info"
    files = {
        "nvidia/__init__.py": "",
        "nvidia/cuda_runtime/__init__.py": "",
        "nvidia/cuda_runtime/lib/libcudart.so.12": "",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: nvidia-fake-cu12\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    image = tmp_path / "image_site" / "nvidia" / "cu13"
    image.mkdir(parents=True)
    (image / "__init__.py").write_text("MARK = 'image'\n")
    site = tmp_path / "site"
    monkeypatch.setattr(checks, "SITE", site)
    path, libs = checks.install_wheels(wheel.parent, sys.executable)
    assert path == str(site) and libs == [str(site / "nvidia" / "cuda_runtime" / "lib")]
    probe = "import nvidia.cu13, nvidia.cuda_runtime; print(nvidia.cu13.MARK)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, str(tmp_path / "image_site")])}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "image"


def test_sigterm_between_steps_still_packs_the_finished_steps(checks, tmp_path, monkeypatch):
    """SIGTERM may land while the results are packed after a step (no step running): the finished step
    must still reach results.tar.gz (it was left only in the unpacked folder, so a first step shorter than
    the packing period came back with no results at all)."""
    real_pack, calls = checks.pack, []

    def pack_stopped_once(results, out, summary):
        calls.append(len(summary["steps"]))
        if len(calls) == 1:  # the pack after the first step: summary.json written, then the signal
            (results / "summary.json").write_text(json.dumps(summary))
            raise checks.Terminated("signal 15")
        real_pack(results, out, summary)

    monkeypatch.setattr(checks, "pack", pack_stopped_once)
    monkeypatch.setitem(checks.PLANS, "test", (
        checks.Step("first", 30, "{py} -c \"print('first done')\"", min_s=1),
        checks.Step("never", 30, "{py} -c \"print('never')\"", min_s=1),
    ))  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        checks.main(["--plan", "test", "--out", str(out), "--wheels", str(tmp_path / "none"), "--budget", "60"])
    assert stopped.value.code == 143
    with tarfile.open(out / "results.tar.gz") as tar:
        summary = json.loads(tar.extractfile("results/summary.json").read())
        assert "results/first.log" in tar.getnames()
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("first", "ok")]
    assert summary["terminated"] is True
