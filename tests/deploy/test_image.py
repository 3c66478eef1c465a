"""The container image definition (deploy/docker/Dockerfile), checked without Docker.

Docker is not available where these tests run, so the image is not built here. What can be
checked is: the base is pinned, the final stage has no build tools and runs as the numeric
non-root UID the chart expects, every path the build copies exists and passes .dockerignore,
and every module the image and the chart run is importable.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass

import pytest

from tests.deploy.chart import APP_UID, REPO_ROOT, SERVICES, containers, release, workloads

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
BASE_IMAGE = "python:3.11-slim-bookworm"
MODULES = [f"services.{name}" for name in (*SERVICES, "identity_sim")]
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|pip install)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.argument for i in self.instructions if i.keyword == keyword]


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    parsed = []
    for line in logical:
        keyword, _, argument = line.partition(" ")
        parsed.append(Instruction(keyword.upper(), argument.strip()))
    return parsed


def stages() -> list[Stage]:
    """Build stages with ARG defaults declared before the first FROM substituted."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions():
        if instruction.keyword == "ARG" and not found:
            name, _, default = instruction.argument.partition("=")
            args[name] = default
        elif instruction.keyword == "FROM":
            words = instruction.argument.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append(Stage(base, name, []))
        else:
            found[-1].instructions.append(instruction)
    return found


def copied_sources() -> list[str]:
    """Build-context paths the Dockerfile copies (COPY --from copies between stages instead)."""
    sources = []
    for stage in stages():
        for argument in stage.all("COPY"):
            words = shlex.split(argument)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            sources += paths[:-1]
    return sources


def test_base_image_is_pinned_python_311_slim_bookworm() -> None:
    bases = [stage.base for stage in stages()]
    assert len(bases) >= 2, "multi-stage: build tools stay out of the final image"
    for base in bases:
        image = base.split("@", 1)[0]
        assert image == BASE_IMAGE, base


def test_final_stage_copies_the_installed_project_and_installs_nothing() -> None:
    build, final = stages()[0], stages()[-1]
    assert any(
        "pip install" in run and "--prefix=/install" in run and run.rstrip().endswith(" .")
        for run in build.all("RUN")
    ), "the build stage installs the project from pyproject.toml"
    assert f"--from={build.name} /install /usr/local" in final.all("COPY")
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), run


def test_runs_as_the_numeric_non_root_uid_the_chart_expects() -> None:
    (user,) = stages()[-1].all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric, so the kubelet can enforce runAsNonRoot"
    assert int(uid) == APP_UID != 0
    assert any(f"--uid {APP_UID}" in run for run in stages()[-1].all("RUN"))


def test_entrypoint_runs_a_module_and_defaults_to_the_ledger() -> None:
    final = stages()[-1]
    assert [json.loads(e) for e in final.all("ENTRYPOINT")] == [["python", "-m"]]
    assert [json.loads(c) for c in final.all("CMD")] == [["services.ledger"]]


def test_there_is_no_healthcheck() -> None:
    # Kubernetes probes gRPC health (services.kernel.probe); a HEALTHCHECK would be a second,
    # divergent opinion.
    assert not [i for i in instructions() if i.keyword == "HEALTHCHECK"]


def test_every_copied_path_exists() -> None:
    missing = [src for src in copied_sources() if not (REPO_ROOT / src).exists()]
    assert missing == [], f"COPY sources missing from the repository: {missing}"


def test_dockerignore_sends_exactly_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {src.rstrip("/") for src in copied_sources()}


@pytest.mark.parametrize("module", MODULES)
def test_the_modules_the_image_runs_exist(module: str) -> None:
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"python -m {module}"


def test_the_chart_runs_only_what_the_image_has() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for obj, spec in workloads(release("everything-on")):
        for container in containers(spec):
            if "command" in container:
                assert container["command"][0] in scripts, obj["metadata"]["name"]
            else:  # the image's ENTRYPOINT is `python -m`; the first arg is the module
                assert container["args"][0] in MODULES, obj["metadata"]["name"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    python, flag, module, *_ = container[kind]["exec"]["command"]
                    assert (python, flag) == ("python", "-m"), obj["metadata"]["name"]
                    assert importlib.util.find_spec(module) is not None, module
