"""The commands README.md and docs/*.md give a user to copy parse as written: every entry point
exists, every option is one its parser knows, every ``--config NAME`` is a shipped config and every
``key=value`` override is a key of the config it targets (a misspelt key fails naming it). Nothing is
run: each command's own parser reads its arguments, and its config loader loads the config."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "architecture.md")]
COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|torchrun|srun)\s")
INLINE_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|torchrun)\s")  # `srun ...` in prose: its options
PLACEHOLDERS = {"STAGE": "run", "C": "default"}  # what a synopsis's placeholders stand for


def _code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(lines of fenced blocks, inline code spans)`` with their 1-based line numbers."""
    fenced, prose, inside = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            fenced.append((number, line))
        else:
            prose.append((number, line))
    spans, joined = [], "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    for match in re.finditer(r"`([^`]+)`", joined):
        spans.append((numbers[joined.count("\n", 0, match.start())], " ".join(match.group(1).split())))
    return fenced, spans


def doc_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every python / torchrun / srun command in the docs' code."""
    found = []
    for doc in DOCS:
        fenced, spans = _code(doc.read_text())
        logical, start = "", 0
        for number, line in fenced:
            if not logical:
                start = number
            logical += " " + line.strip()
            if logical.endswith("\\"):
                logical = logical[:-1]
                continue
            for part in logical.split("&&"):
                if COMMAND_START.match(part.strip()):
                    found.append((f"{doc.name}:{start}", part.strip()))
            logical = ""
        found += [(f"{doc.name}:{n}", s) for n, s in spans if INLINE_START.match(s)]
    return found


def _argv(command: str) -> list[str]:
    command = re.sub(r"\[(--[^\]]*)\]", r"\1", command)  # [--image-size 448]: an optional option, shown
    command = command.replace("[key=value ...]", "")
    tokens = [PLACEHOLDERS.get(t, t) for t in shlex.split(command, comments=True) if t != "..."]
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # OMP_NUM_THREADS=2 python ...
        tokens.pop(0)
    if tokens and tokens[0] == "srun":
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("-"):
            tokens.pop(0)
    if tokens and tokens[0] == "torchrun":
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("--"):
            tokens.pop(0)
        return tokens
    assert tokens and tokens[0] == "python", command
    return tokens[1:]


def _module_of(argv: list[str]) -> tuple[str, list[str]]:
    """``(module or script path, its arguments)``."""
    if argv[0] == "-m":
        return argv[1], argv[2:]
    return argv[0], argv[1:]


def _import_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_doc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    pass


def _parse_only(main, args: list[str]) -> None:
    """Run ``main(args)`` up to its parser's answer: the arguments are parsed, nothing else runs."""
    import argparse
    from unittest import mock

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, argv=None, namespace=None):
        real(parser, argv, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), pytest.raises(_Parsed):
        main(args)


def _placeholder(config: str | None) -> bool:
    """A config path the docs stand for (OUT/config.yaml, OUT_HR/config.yaml): not checked."""
    return bool(config) and ("/" in config and config.endswith(".yaml") and not (REPO / config).exists())


def check_command(command: str) -> None:
    """Parse ``command`` as its entry point would and load the config it names with its overrides."""
    from dinov2.utils.config import load_config

    synopsis = "[key=value ...]" in command
    target, args = _module_of(_argv(command))
    if target == "pytest":
        return
    mention = not args  # `python -m dinov2.eval.pca` in prose names the command: it must exist
    name = target.removesuffix(".py").replace("/", ".") if target.startswith("dinov2") else target
    if target.startswith("scripts/"):
        path = REPO / target
        assert path.is_file(), f"no script {target}"
        module = _import_script(path)
        if mention:
            return
        parsed = module.parse_args(args)
        if hasattr(module, "load_benchmark_config"):
            module.load_benchmark_config(parsed)
        return
    assert importlib.util.find_spec(name) is not None, f"no module {name}"
    if target.endswith(".py"):
        assert (REPO / target).is_file(), f"no file {target}"
    if mention:
        return
    if name.startswith("dinov2.run."):
        from dinov2.run.submit import parse_launcher_args

        entry = importlib.import_module(name).ENTRY
        _, _, entry_args = parse_launcher_args(entry, args)
        config = getattr(entry_args, entry.config_attr)
        if not _placeholder(config):
            entry.load_config(config or None, entry_args.opts)
        return
    module = importlib.import_module(name)
    if name == "dinov2.curation.__main__" or name == "dinov2.curation":
        from dinov2.curation.__main__ import parse_args
        from dinov2.curation.pipeline import load_curation_config

        parsed = parse_args(args)
        try:
            load_curation_config(parsed.config or None, parsed.opts)
        except ValueError as error:  # a synopsis (`... [key=value ...]`) leaves the required pool to the user
            if not (synopsis and "the config leaves '???'" in str(error)):
                raise
        return
    if name == "dinov2.data.datasets.imagenet":  # its parser is built in main(): parse, then stop
        _parse_only(module.main, args)
        return
    parsed = module.get_args_parser().parse_args(args)
    if name == "dinov2.train.train":
        load_config(parsed.config or None, parsed.opts)
    elif name in ("dinov2.eval.knn", "dinov2.eval.linear", "dinov2.eval.log_regression", "dinov2.eval.pca"):
        if not _placeholder(parsed.config_file):
            load_config(parsed.config_file or None, list(parsed.opts))


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "training.md", "evaluation.md", "curation.md", "recipes.md"} <= where
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, command):
    try:
        check_command(command)
    except SystemExit as error:  # argparse's error exit (its message went to stderr); --help exits 0
        if error.code not in (0, None) or "--help" not in command:
            pytest.fail(f"{where}: the parser rejects {command!r} (exit {error.code})")


@pytest.mark.parametrize(
    "command",
    [
        "python dinov2/train/train.py --config quickstrat --output-dir OUT",  # no such config
        "python dinov2/train/train.py --config quickstart --output-dir OUT optim.lrr=1e-3",  # no such key
        "python dinov2/train/train.py --config quickstart --ouput-dir OUT",  # no such option
        "python dinov2/eval/knn.py --config-file vits14_pretrain --nb-knns 10",
        "python dinov2/run/train/train.py --ngpu 8 --config quickstart --output-dir OUT",
        "python -m dinov2.curation run --config lvd_vitl14 --output-dir OUT pool=/p retrieval.sedes=[]",
        "python -m dinov2.eval.linear_probe --output-dir OUT",  # no such module
        "python scripts/benchmark_train.py --config quickstart --iterations 3",
        "python -m dinov2.data.datasets.imagenet --root /data/in1k --extras /data/in1k-extra",
    ],
)
def test_the_check_rejects_a_wrong_command(command):
    with pytest.raises((SystemExit, AssertionError, ValueError, FileNotFoundError)):
        check_command(command)


def _expand(name: str) -> list[str]:
    """``dinov2_vit{s,b}14[_reg]`` -> every name it stands for."""
    match = re.search(r"\{([^}]*)\}", name)
    if match:
        return [
            n for part in match.group(1).split(",") for n in _expand(name[: match.start()] + part + name[match.end() :])
        ]
    match = re.search(r"\[([^\]]*)\]", name)
    if match:
        return [n for part in ("", match.group(1)) for n in _expand(name[: match.start()] + part + name[match.end() :])]
    return [name]


def test_hub_entries_the_docs_name_exist():
    import hubconf

    named = {n for doc in DOCS for n in re.findall(r"\bdinov2_vit[][a-z0-9_{},]*", doc.read_text())}
    entries = {n for name in named if "pretrain" not in name for n in _expand(name.rstrip("_"))} - {"dinov2_vit"}
    assert {"dinov2_vitl14", "dinov2_vitg14_reg_lc", "dinov2_vits14"} <= entries
    missing = sorted(n for n in entries if not callable(getattr(hubconf, n, None)))
    assert not missing, f"hub entries named in the docs but not in hubconf.py: {missing}"


def test_python_snippets_import():
    import ast
    import textwrap

    checked = 0
    for doc in DOCS:
        for block in re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", doc.read_text(), flags=re.S | re.M):
            for node in ast.walk(ast.parse(textwrap.dedent(block))):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("dinov2"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{doc.name}: {node.module} has no {alias.name}"
                        checked += 1
    assert checked >= 6


def test_dataset_strings_in_the_docs_parse():
    from dinov2.data.datasets import _constructor_kwargs, _dataset_class, parse_dataset_str

    pattern = r"(?<![\w/])((?:ImageNet22k|ImageNet|ImageFolder|FileList|Synthetic)(?::[\w.]+=[^\s:`'\",)\]]+)+)"
    found = {s for doc in DOCS for s in re.findall(pattern, doc.read_text())}
    assert len(found) > 10
    for dataset_str in sorted(found):
        name, raw = parse_dataset_str(dataset_str)
        if name == "ImageNet" and set(raw) == {"split"}:  # the eval scripts' defaults, as the table gives them
            continue
        _constructor_kwargs(_dataset_class(name), raw)  # names its class and every key it takes


def test_install_extras_and_console_scripts_exist():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    named = {e for doc in DOCS for e in re.findall(r'pip install -e "\.\[(\w+)\]"', doc.read_text())}
    assert "dev" in named
    assert named <= set(project["optional-dependencies"]), named - set(project["optional-dependencies"])
    for script, target in project["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function, None)), f"{script}: no {target}"
