"""scripts/device/benchmark_original.py, which times the original implementation beside ours: it must
import the original's copy and never ours (both packages are named dinov2), unpack the copy it is
given or name what it found instead, and give torch's FSDP back what the original's torch-2.0 code uses.
The original itself is not here; its CPU rehearsal is the ``smoke`` plan of gpu_checks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "device" / "benchmark_original.py"
LOAD = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('benchmark_original', {str(SCRIPT)!r})\n"
    "bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)\n"
)


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` after loading the script, in a fresh interpreter that can import our dinov2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", LOAD + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _fake_original(root: Path, mark: str = "the original") -> Path:
    (root / "dinov2").mkdir(parents=True)
    (root / "dinov2" / "__init__.py").write_text(f"MARK = {mark!r}\n")
    return root


def _fake_wheel(path: Path, mark: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dinov2/__init__.py", f"MARK = {mark!r}\n")
        archive.writestr("dinov2-0.0.1.dist-info/METADATA", "Name: dinov2\n")
    return path


@pytest.fixture
def bench(script):
    return script("device/benchmark_original.py", "benchmark_original")


def test_the_named_copy_is_imported_even_with_ours_on_the_path(tmp_path):
    copy = _fake_original(tmp_path / "copy")
    ours = _python("import dinov2; print(dinov2.__file__)", tmp_path)
    assert ours.returncode == 0 and Path(ours.stdout.strip()).resolve() == REPO / "dinov2" / "__init__.py"
    done = _python(f"""
        mod = bench.import_original(bench.Path({str(copy)!r}))
        print(mod.MARK + "|" + mod.__file__)
        """, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    mark, where = done.stdout.strip().split("|")
    assert mark == "the original" and Path(where).resolve() == (copy / "dinov2" / "__init__.py").resolve()


def test_a_dinov2_already_imported_is_refused_by_name(tmp_path):
    copy = _fake_original(tmp_path / "copy")
    done = _python(f"""
        import dinov2
        bench.import_original(bench.Path({str(copy)!r}))
        """, tmp_path)  # fmt: skip
    assert done.returncode != 0
    assert "a dinov2 package is already imported from" in done.stderr and str(REPO / "dinov2") in done.stderr


def test_a_wheel_or_a_folder_is_unpacked_and_a_bad_source_named(bench, tmp_path):
    wheel = _fake_wheel(tmp_path / "dinov2-0.0.1-py3-none-any.whl", "from the wheel")
    for source in (wheel, tmp_path):  # the wheel, or the folder holding it
        scratch = tmp_path / f"scratch_{source.name}"
        scratch.mkdir()
        root = bench.locate_package(source, scratch)
        assert root == scratch and "from the wheel" in (root / "dinov2" / "__init__.py").read_text()
    unpacked = _fake_original(tmp_path / "checkout")
    assert bench.locate_package(unpacked, tmp_path / "unused") == unpacked  # a folder with the package
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="found nothing"):
        bench.locate_package(empty, tmp_path / "unused")
    _fake_wheel(tmp_path / "dinov2-0.0.2-py3-none-any.whl", "another")
    with pytest.raises(SystemExit, match=r"dinov2-0\.0\.1-py3-none-any\.whl.*dinov2-0\.0\.2-py3-none-any\.whl"):
        bench.locate_package(tmp_path, tmp_path / "unused")  # two wheels: which one is meant is not guessed


def test_fsdp_gets_back_the_torch20_attributes_the_original_uses(tmp_path):
    done = _python("""
        import json, os, types
        import torch, torch.distributed as dist
        import torch.distributed.fsdp._runtime_utils as runtime
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        calls = []
        def _reshard(state, handle, free_unsharded_flat_param):  # torch's signature since 2.1
            calls.append([state, handle, free_unsharded_flat_param])
        torch_reshard, runtime._reshard = runtime._reshard, _reshard
        package = types.SimpleNamespace()
        adapted = bench.torch20_fsdp_adapters(package)
        package._reshard("state", ["h1", "h2"], [True, False])  # torch 2.0's signature, as the original calls it
        runtime._reshard = torch_reshard  # FSDP's own, for the modules below

        dist.init_process_group("gloo", init_method="file://" + os.path.abspath("pg"), rank=0, world_size=1)
        def wrapped():
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            root = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True)
            root(torch.randn(3, 4))  # lazy init: the root learns its states
            return root
        student, teacher = wrapped(), wrapped()
        handles_ok = all(m._handles == ([m._handle] if m._handle is not None else []) for m in FSDP.fsdp_modules(student))
        flat_ok = all(p in [h.flat_param for h in m._handles] for m in FSDP.fsdp_modules(student) for p in m.params)
        marker = object()
        teacher._unshard_stream = marker
        student._streams = teacher._streams  # as the original shares the teacher's streams
        shared = [s._unshard_stream is marker for s in student._all_fsdp_states]
        print(json.dumps({"calls": calls, "adapted": adapted, "handles_ok": handles_ok, "flat_ok": flat_ok,
                          "shared": shared, "keys": sorted(teacher._streams)}))
        """, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["calls"] == [["state", "h1", True], ["state", "h2", False]]
    assert report["handles_ok"] and report["flat_ok"]
    assert len(report["shared"]) == 3 and all(report["shared"])  # the root and its two wrapped layers
    assert "_unshard_stream" in report["keys"] and "_post_backward_stream" in report["keys"]
    assert any("_handles" in a for a in report["adapted"]) and any("_reshard" in a for a in report["adapted"])


def test_bad_arguments_are_named(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--source", "x", "student.arch"])
    assert "overrides are key=value: student.arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--source", "x", "--iters", "0"])
    assert "--iters and --num-batches >= 1" in capsys.readouterr().err
    args = bench.parse_args(["--source", "x", "student.arch=vit_base"])
    assert args.overrides == ["student.arch=vit_base"] and args.config == "vitl16_short"


def test_auto_drops_the_forced_attention_op_and_keeps_the_rest(bench):
    seen = []

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):  # xFormers' signature
        seen.append((q, k, v, attn_bias, op))
        return "out"

    module = type("attention", (), {"memory_efficient_attention": staticmethod(memory_efficient_attention)})
    note = bench.let_xformers_choose(module)
    assert module.memory_efficient_attention("q", "k", "v", attn_bias="bias", op="flash") == "out"
    assert seen == [("q", "k", "v", "bias", None)] and "xFormers picks" in note
