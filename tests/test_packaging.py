"""The container image, proved without Docker: the Dockerfile's own steps, run on this machine.

The Dockerfile is the one source of truth. These tests read it and replay what the image build
does: COPY the build context (filtered by .dockerignore) into a work directory, run the build
stage's `pip wheel` line, create a fresh virtualenv standing in for the runtime image's Python,
run the runtime stage's `pip install` line in it, then start the ENTRYPOINT with the stage's ENV
and check the HEALTHCHECK command, a streamed chat over a real WebSocket and a clean exit on the
STOPSIGNAL. Only the interpreter differs: this machine's Python 3.11 instead of python:3.11-slim.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from hubgate.settings import Settings
from hubgate.tokens import mint_dev_token
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import AWS_ENV, TEST_SECRET
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BASE_IMAGE = "python:3.11-slim"


# ---------------------------------------------------------------------------- Dockerfile reader


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]

    def env(self) -> dict[str, str]:
        """The stage's ENV, in the `ENV key=value ...` form."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use the ENV key=value form: {args!r}"
                values[key] = value
        return values

    def runs(self) -> list[list[str]]:
        """Each RUN command as argv, without its BuildKit --mount options."""
        commands = []
        for args in self.all("RUN"):
            argv = shlex.split(args)
            while argv and argv[0].startswith("--"):
                argv.pop(0)
            commands.append(argv)
        return commands

    def pip(self, subcommand: str) -> list[str]:
        """The one RUN of this stage that is `pip <subcommand> ...` on its own."""
        found = [argv for argv in self.runs() if argv[:2] == ["pip", subcommand]]
        assert len(found) == 1, f"stage {self.name}: expected one `pip {subcommand}` RUN, found {found}"
        assert "&&" not in found[0] and ";" not in found[0], "keep the pip step a command of its own"
        return found[0]


def logical_lines(text: str) -> Iterator[str]:
    """Instruction lines: comments dropped, backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"


def parse_dockerfile(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"name every stage: FROM {args}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            stages.append(Stage(name=words[2], base=base))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(negated, pattern) per line of .dockerignore."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, line.lstrip("!").strip("/")))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: a pattern matching a path or any parent of it applies; the last one wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, pattern in rules:
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILD, RUNTIME = STAGES[0], STAGES[-1]


# ---------------------------------------------------------------------------- the recipe, read


def test_the_image_is_built_in_two_stages_from_python_slim() -> None:
    assert len(STAGES) == 2
    assert BUILD.base == RUNTIME.base == BASE_IMAGE
    assert BUILD.pip("wheel")[:3] == ["pip", "wheel", "--no-deps"]
    install = RUNTIME.pip("install")
    assert "--no-cache-dir" in install
    assert install[-1] == "/dist/*.whl"
    # The wheel comes from the build stage by a bind mount: it is never a layer of the image.
    mounts = [args for args in RUNTIME.all("RUN") if "pip install" in args]
    assert "--mount=type=bind,from=build,source=/dist,target=/dist" in mounts[0]
    for argv in RUNTIME.runs():
        assert not {"apt-get", "gcc", "build-essential"} & set(argv), argv
    assert not RUNTIME.all("COPY"), "the runtime stage gets nothing but the wheel"


def test_the_runtime_stage_runs_hubgate_serve_as_a_non_root_user() -> None:
    env = RUNTIME.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["HUBGATE_HOST"] == "0.0.0.0" and env["HUBGATE_PORT"] == "8080"
    assert {name for name in env if name.startswith("HUBGATE_")} <= Settings.env_names()

    user = RUNTIME.one("USER").split(":")[0]
    assert user not in ("root", "0")
    keywords = [kw for kw, _ in RUNTIME.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")

    assert RUNTIME.one("EXPOSE") == "8080"
    assert RUNTIME.one("STOPSIGNAL") == "SIGTERM"
    assert json.loads(RUNTIME.one("ENTRYPOINT")) == ["hubgate", "serve"]
    assert not RUNTIME.all("CMD")

    options, _, command = RUNTIME.one("HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    assert command.startswith("python -c ")
    assert "http://127.0.0.1:${HUBGATE_PORT:-8080}/healthz" in command


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    rules = dockerignore_rules()
    for source in copied_sources():
        assert not ignored(source, rules), f"{source} is copied but excluded by .dockerignore"
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "src/hubgate/__pycache__/x.pyc"):
        assert ignored(path, rules), path
    assert not ignored("src/hubgate/data/demo-tenants.yaml", rules)


# ---------------------------------------------------------------------------- the recipe, run


def copied_sources() -> list[str]:
    sources = []
    for args in BUILD.all("COPY"):
        words = shlex.split(args)
        assert not any(w.startswith("--") for w in words), "the build stage copies from the context"
        sources += words[:-1]
    return sources


def copy_build_context(workdir: Path) -> None:
    """The build stage's COPY instructions, from the context .dockerignore leaves."""
    rules = dockerignore_rules()
    for args in BUILD.all("COPY"):
        *sources, dest = shlex.split(args)
        target = workdir / dest
        for source in sources:
            path = REPO / source
            if path.is_file():
                if not ignored(source, rules):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
                continue
            for file in path.rglob("*"):
                relative = file.relative_to(REPO).as_posix()
                if file.is_file() and not ignored(relative, rules):
                    destination = target / file.relative_to(path)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, destination)


def localise(argv: list[str], pip: list[str], paths: dict[str, Path]) -> list[str]:
    """A RUN's argv with `pip` replaced and container paths mapped to local ones (globs expanded)."""
    out = list(pip)
    for word in argv[1:]:
        for container, local in paths.items():
            if word == container or word.startswith(container + "/"):
                word = str(local) + word[len(container) :]
        if "*" in word:
            matches = sorted(glob.glob(word))
            assert matches, f"nothing matches {word}"
            out += matches
        else:
            out.append(word)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without anything that would leak the repository's own setup."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBGATE_") and k not in dropped}
    env.update(extra)
    return env


@dataclass
class Image:
    venv: Path
    env: dict[str, str]  # the runtime stage's ENV over a clean environment, venv first on PATH

    def argv(self, words: list[str]) -> list[str]:
        return [str(self.venv / "bin" / words[0]), *words[1:]]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    dist, venv = root / "dist", root / "venv"
    # The runtime stage's Python stands apart from the build; make it while the wheel builds.
    making_venv = subprocess.Popen([sys.executable, "-m", "venv", str(venv)])

    workdir = root / "build" / BUILD.one("WORKDIR").lstrip("/")
    copy_build_context(workdir)
    wheel = localise(BUILD.pip("wheel"), [sys.executable, "-m", "pip"], {"/dist": dist})
    subprocess.run(wheel, cwd=workdir, env=clean_env(**BUILD.env()), check=True, capture_output=True)
    assert making_venv.wait(timeout=60) == 0

    runtime_env = clean_env(**RUNTIME.env())
    runtime_env["PATH"] = f"{venv / 'bin'}{os.pathsep}{runtime_env.get('PATH', '')}"
    install = localise(RUNTIME.pip("install"), [str(venv / "bin" / "pip")], {"/dist": dist})
    done = subprocess.run(install, cwd=root, env=runtime_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Image(venv=venv, env=runtime_env)


def run_healthcheck(image: Image, port: int) -> int:
    _, _, command = RUNTIME.one("HEALTHCHECK").partition(" CMD ")
    env = {**image.env, "HUBGATE_PORT": str(port)}
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, timeout=20).returncode


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path


@pytest.fixture
def served(image: Image, emulator: EmulatorServer, tmp_path: Path) -> Iterator[Served]:
    """The ENTRYPOINT, started as the container starts it, once /healthz answers."""
    located = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", "import hubgate; print(hubgate.__file__)"],
        cwd=tmp_path,
        env=image.env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(located.stdout.strip()).is_relative_to(image.venv), "hubgate must come from the wheel"

    port = free_port()
    env = {
        **image.env,
        **AWS_ENV,
        "HUBGATE_PORT": str(port),
        "HUBGATE_JWT_HS256_SECRET": TEST_SECRET,
        "HUBGATE_BEDROCK_ENDPOINT_URL": emulator.url,
    }
    log_path = tmp_path / "hubgate.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            image.argv(json.loads(RUNTIME.one("ENTRYPOINT"))),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=2) as http:
            while True:
                assert process.poll() is None, log_path.read_text(errors="replace")[-4000:]
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway never answered /healthz"
                time.sleep(0.1)
        yield Served(process=process, port=port, log=log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_installed_wheel_serves_a_chat_and_drains_on_sigterm(image: Image, served: Served) -> None:
    port = served.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        assert (await http.get("/readyz")).json()["status"] == "ready"
    assert await asyncio.to_thread(run_healthcheck, image, port) == 0

    token = mint_dev_token(TEST_SECRET, tenant="acme", user="u")
    client = await Client.open(f"ws://127.0.0.1:{port}/v1/stream", token)
    frames = await client.chat("r1", "Say something about harbours")
    assert frames[0]["type"] == "start"
    assert frames[-1]["type"] == "end", frames[-1]
    assert text_of(frames)

    # The STOPSIGNAL, as `docker stop` and ECS send it: a draining frame, 1012, exit 0.
    served.process.send_signal(getattr(signal, RUNTIME.one("STOPSIGNAL")))
    assert (await client.recv())["type"] == "draining"
    assert (await client.wait_closed())[0] == 1012
    status = await asyncio.to_thread(served.process.wait, 30)
    assert status == 0, served.log.read_text(errors="replace")[-4000:]
    assert await asyncio.to_thread(run_healthcheck, image, port) != 0
