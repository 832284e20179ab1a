"""The images, checked without a container engine: hadolint, non-root users, the package CLIs as
entrypoints, a torch-free operator image, every `dsworker`/`deepseek-operator` command that the
images, the chart, the docs or the operator's planned pods run exists in the package CLI, and
nothing anywhere unpickles or runs code shipped with a checkpoint.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
WORKER_DOCKERFILES = sorted((REPO / "worker_image").glob("Dockerfile.*"))
DOCKERFILES = [OPERATOR_DOCKERFILE, *WORKER_DOCKERFILES]
IDS = [str(p.relative_to(REPO)) for p in DOCKERFILES]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Packages that deserialise with pickle (arbitrary code execution on load).
PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
# torch.distributed collectives that pickle their payload.
PICKLING_CALLS = {
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) form; the shell form would run a shell as PID 1."""
    assert args.startswith("["), f"not the exec form: {args}"
    return list(yaml.safe_load(args))


def dsworker_commands() -> set[str]:
    """The subcommands `dsworker --help` lists (the package CLI itself, as installed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    block = proc.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    found = set(re.findall(r"^ {4}([a-z][a-z0-9-]*)", block, re.M))
    listed = re.search(r"\{([a-z0-9,-]+)\}", proc.stdout)
    if listed:
        found |= set(listed.group(1).split(","))
    assert found, proc.stdout
    return found


def referenced_dsworker_commands(text: str) -> Iterator[str]:
    """`dsworker <sub>` in prose, shell snippets or YAML lists (["dsworker", "shard", ...])."""
    for match in re.finditer(r"(?<![/\w-])dsworker\b[\"', \t]+([a-z][a-z0-9-]*)", text):
        yield match.group(1)


# ---------------------------------------------------------------------------------------------


def test_hadolint_config_ignores_only_with_a_reason() -> None:
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    assert config.get("failure-threshold") == "style", "every finding must fail the lint"
    for rule in config.get("ignored", []):
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        reason = []
        for line in reversed(lines[:index]):
            if not line.strip().startswith("#"):
                break
            reason.append(line)
        assert len(" ".join(reason)) > 40, f"{rule} is ignored without a reason"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_runs_as_a_non_root_user(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [s for s in steps if s.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    final = users[-1]
    user = final.args.split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), final
    # Nothing after the final USER runs as someone else.
    assert all(s.keyword != "USER" for s in steps if s.line > final.line)
    # The numeric id is the one the RUN step created, so Kubernetes' runAsNonRoot can verify it.
    created = " ".join(s.args for s in steps if s.keyword == "RUN")
    assert re.search(rf"useradd\b[^&]*--uid {user}\b", created), "USER is not created by useradd"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_entrypoint_is_the_package_cli(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    (entrypoint,) = [exec_form(s.args) for s in steps if s.keyword == "ENTRYPOINT"]
    want = "deepseek-operator" if dockerfile == OPERATOR_DOCKERFILE else "dsworker"
    assert entrypoint == [want]
    assert want in PYPROJECT["project"]["scripts"]
    for cmd in [exec_form(s.args) for s in steps if s.keyword == "CMD"]:
        if want == "dsworker" and cmd and not cmd[0].startswith("-"):
            assert cmd[0] in dsworker_commands(), cmd


def test_operator_image_has_no_torch() -> None:
    """The control plane never imports torch: its image installs only the operator extra, and
    neither that extra nor the core dependencies pull in torch, numpy or safetensors."""
    heavy = re.compile(r"^(torch|torch[-_]npu|numpy|safetensors|transformers)\b", re.I)
    project = PYPROJECT["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["operator"]:
        assert not heavy.match(dep), dep
    runs = " ".join(s.args for s in instructions(OPERATOR_DOCKERFILE) if s.keyword == "RUN")
    installs = re.findall(r"pip install ((?:[^&;])+)", runs)
    assert installs
    for install in installs:
        words = [w for w in shlex.split(install) if not w.startswith("-")]
        for word in words:
            assert not heavy.match(word), word
            if "[" in word:
                assert word.endswith("[operator]"), f"operator image installs {word}"
    froms = [s.args for s in instructions(OPERATOR_DOCKERFILE) if s.keyword == "FROM"]
    assert froms and all("slim" in f or "distroless" in f for f in froms), froms


@pytest.mark.parametrize(
    ("suffix", "base", "needs"),
    [
        ("npu", "cann", ["torch==", "torch_npu=="]),
        ("cuda", "nvidia/cuda", ["torch=="]),
        ("cpu", "python", ["torch==", "download.pytorch.org/whl/cpu"]),
    ],
)
def test_worker_images_per_device(suffix: str, base: str, needs: list[str]) -> None:
    path = REPO / "worker_image" / f"Dockerfile.{suffix}"
    text = path.read_text()
    steps = instructions(path)
    args = {s.args.split("=")[0]: s.args.split("=", 1)[-1] for s in steps if s.keyword == "ARG"}
    (image,) = [s.args for s in steps if s.keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    assert base in image, image
    assert ":latest" not in image and ":" in image, "base image must be pinned by tag"
    for need in needs:
        assert need in text, f"{path.name}: {need}"
    runs = " ".join(s.args for s in steps if s.keyword == "RUN")
    assert "[worker]" in runs
    # Devices come through the device plugins only.
    assert "privileged" not in runs and "/dev/davinci" not in runs


def test_no_dockerfile_enables_remote_code_or_pickle() -> None:
    for path in DOCKERFILES:
        text = path.read_text().lower()
        for bad in ("trust_remote_code", "trust-remote-code", "pickle", "torch.load"):
            assert bad not in text, f"{path}: {bad}"


def _python_sources() -> Iterator[Path]:
    for root in (REPO / "operator" / "deepseek_operator", REPO / "worker_image" / "dsworker"):
        yield from sorted(root.rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    list(_python_sources()),
    ids=lambda p: (
        str(p.relative_to(REPO / "worker_image"))
        if "worker_image" in str(p)
        else str(p.relative_to(REPO / "operator"))
    ),
)
def test_no_pickle_and_no_remote_code(path: Path) -> None:
    """Only safetensors and JSON are ever read: no pickle-based loaders or collectives, no
    torch.load, no trust_remote_code=True."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
            assert not names & PICKLE_MODULES, f"{path}:{node.lineno} imports {names}"
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in PICKLE_MODULES, f"{path}:{node.lineno}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else ""
            )
            assert not (owner == "torch" and name == "load"), f"{path}:{node.lineno} torch.load"
            assert name not in PICKLING_CALLS, f"{path}:{node.lineno} {name} pickles"
            for kw in node.keywords:
                if kw.arg == "trust_remote_code":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, (
                        f"{path}:{node.lineno} trust_remote_code"
                    )
                if kw.arg == "allow_pickle":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, (
                        f"{path}:{node.lineno} allow_pickle"
                    )


def _code_of(path: Path) -> str:
    """The parts of a file that hold commands: the instructions of a Dockerfile, all of a YAML
    file or template, and only the code blocks and `code spans` of Markdown (so prose such as
    "the dsworker image" is skipped)."""
    if path.name.startswith("Dockerfile"):
        return "\n".join(f"{s.keyword} {s.args}" for s in instructions(path))
    text = path.read_text()
    if path.suffix != ".md":
        return text  # comments included: they hold commands to copy, such as `dsworker synth`
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return "\n".join(blocks + [s.replace("\n", " ") for s in spans])


def test_dsworker_commands_named_in_images_chart_and_docs_exist() -> None:
    """Every `dsworker <command>` written in the Dockerfiles, the chart, the examples and the
    docs is a subcommand the CLI really has."""
    known = dsworker_commands()
    places = [*DOCKERFILES, REPO / "README.md"]
    for folder in ("charts", "docs", "examples"):
        places += [p for p in (REPO / folder).rglob("*") if p.suffix in {".md", ".yaml", ".tpl"}]
    unknown: dict[str, set[str]] = {}
    for place in places:
        for command in referenced_dsworker_commands(_code_of(place)):
            if command not in known:
                unknown.setdefault(str(place.relative_to(REPO)), set()).add(command)
    assert not unknown, f"unknown dsworker commands: {unknown} (known: {sorted(known)})"


def _planned_objects(example: Path) -> list[dict[str, Any]]:
    """What the operator applies for an example: first (nothing observed), then with the
    sharding Job complete (the workers)."""
    from deepseek_operator.planning import plan
    from deepseek_operator.planning.observed import Observed

    body = yaml.safe_load(example.read_text())
    body["metadata"].update(namespace="llm", uid="0000-1111", generation=1)
    first = plan(body, Observed())
    out = list(first.apply)
    # Every sharding Job complete at once (a node-local store has one per node).
    done = [
        {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
        for job in first.apply
        if job["kind"] == "Job"
    ]
    if done:
        claims = [
            {**c, "status": {"phase": "Bound"}}
            for c in first.apply
            if c["kind"] == "PersistentVolumeClaim"
        ]
        out += plan(body, Observed(jobs=done, claims=claims)).apply
    return out


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec") or {}
    pod = (spec.get("jobTemplate", {}).get("spec", spec).get("template") or {}).get("spec") or {}
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


EXAMPLE_FILES = sorted((REPO / "examples").glob("*.yaml")) + sorted(
    (REPO / "tests" / "data" / "valid").glob("*.yaml")
)


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_planned_pods_run_real_dsworker_commands(example: Path) -> None:
    """Every container the operator plans that runs `dsworker` names a subcommand the CLI has,
    and the CLI's own parser accepts its arguments (so no pod dies on a usage error)."""
    pytest.importorskip("deepseek_operator.planning.plan")
    from dsworker.cli import build_parser

    known = dsworker_commands()
    seen = set()
    for obj in _planned_objects(example):
        for container in _containers(obj):
            command = [*container.get("command", []), *container.get("args", [])]
            if not command or command[0] != "dsworker":
                continue
            sub = command[1]
            assert sub in known, f"{obj['kind']} {container['name']}: dsworker {sub}"
            argv = [re.sub(r"\$\((\w+)\)", "0", a) for a in command[1:]]
            try:
                build_parser(sub).parse_args(argv)
            except SystemExit:
                pytest.fail(f"{obj['kind']} {container['name']}: dsworker rejects {argv}")
            seen.add(sub)
    spec = yaml.safe_load(example.read_text())["spec"]
    engine = (spec.get("runtime") or {}).get("engine", "dsworker")
    # MindIE and vLLM serve from their own images; dsworker still stages for them.
    assert ("serve" in seen) == (engine == "dsworker"), seen
    if engine == "vllm":
        assert "stage-checkpoint" in seen
    if spec.get("sharding", {}).get("enabled", True):
        assert "shard" in seen


def _dist_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_operator_runs_with_only_the_operator_dependencies() -> None:
    """The operator image installs the core and `operator` dependencies only: the operator must
    import and start its CLI with every worker-only package (torch, numpy, ...) unimportable."""
    project = PYPROJECT["project"]
    operator_deps = _dist_names(
        project["dependencies"] + project["optional-dependencies"]["operator"]
    )
    worker_only = _dist_names(project["optional-dependencies"]["worker"]) - operator_deps
    modules = {name.replace("-", "_") for name in worker_only} | {"torch_npu", "transformers"}
    assert {"torch", "numpy"} <= modules
    script = f"""
import importlib.abc, sys
BLOCKED = {sorted(modules)!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the operator image")
        return None
sys.meta_path.insert(0, Block())
import deepseek_operator.__main__ as m
import deepseek_operator.generators.crd, deepseek_operator.generators.docs
import deepseek_operator.generators.peering, deepseek_operator.planning.plan
import deepseek_operator.runtime.handlers, deepseek_operator.runtime.reconcile
m.parse_args(["--standalone", "--namespace", "llm"])
print("ok")
"""
    if not (REPO / "operator" / "deepseek_operator" / "__main__.py").exists():
        pytest.skip("the operator's entry point is not written yet")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _final_uid(path: Path) -> int:
    user = [s for s in instructions(path) if s.keyword == "USER"][-1].args
    return int(user.split(":")[0])


def test_image_users_match_the_pods_that_run_them() -> None:
    """runAsNonRoot can only verify a numeric USER; the pods' runAsUser must be that uid."""
    values = yaml.safe_load((REPO / "charts" / "deepseek-operator" / "values.yaml").read_text())
    assert _final_uid(OPERATOR_DOCKERFILE) == values["securityContext"]["runAsUser"]
    objects = pytest.importorskip("deepseek_operator.planning.objects")
    for dockerfile in WORKER_DOCKERFILES:
        assert _final_uid(dockerfile) == objects.RUN_AS, dockerfile.name
