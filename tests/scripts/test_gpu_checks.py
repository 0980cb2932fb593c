"""scripts/device/gpu_checks.py, the prepared run for a lent GPU: time limits, the budget, kept results,
and that every planned benchmark command parses and names configs that load (a typo found on the
GPU machine costs device minutes; found here it costs nothing)."""

from __future__ import annotations

import json
import os
import sys
import tarfile
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
