"""docker-compose.yml and the Dockerfiles, checked statically (no Docker engine here: nothing calls docker)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
BUILT = {name: svc for name, svc in SERVICES.items() if "build" in svc}


def _words(value) -> list[str]:
    """A compose command/entrypoint (a list or a shell string) as words."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [w for item in value for w in (shlex.split(item) if " " in item else [item])]


def _build(svc: dict) -> tuple[Path, Path]:
    build = svc["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _copy_sources(args: str) -> list[str] | None:
    """The sources of a COPY/ADD; None when they come from another stage or image (--from)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"COPY {args}: no source or destination"
    return paths[:-1]


def _extra(name: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """The requirements of one of this project's extras, self-references (mergeforge[a,b]) expanded."""
    project = PYPROJECT["project"]["name"]
    out = []
    for req in PYPROJECT["project"]["optional-dependencies"][name]:
        match = re.fullmatch(rf"\s*{re.escape(project)}\s*\[([^\]]+)\]\s*", req)
        if match:
            for sub in (s.strip() for s in match.group(1).split(",")):
                if sub not in seen:
                    out += _extra(sub, seen | {name})
        else:
            out.append(req)
    return out


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower()


# ---------------------------------------------------------------------------------------------------- services
def test_the_services_exist():
    expected = {"api", "worker-cpu", "worker-gpu", "redis", "minio", "minio-init", "flower"}
    assert expected <= SERVICES.keys(), f"missing services: {sorted(expected - SERVICES.keys())}"


def test_dependencies_name_services_and_volumes_are_declared():
    volumes = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        depends = svc.get("depends_on") or []
        for dep in depends if isinstance(depends, list) else depends.keys():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name} mounts undeclared named volume {source}"


def test_redis_persists_with_an_append_only_file():
    words = _words(SERVICES["redis"].get("command"))
    assert "--appendonly" in words, f"redis command {words} has no --appendonly"
    assert words[words.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in SERVICES["redis"].get("volumes", [])), "redis /data is not a volume"


def test_minio_init_creates_the_bucket_the_services_use():
    init = SERVICES["minio-init"]
    script = " ".join(_words(init.get("entrypoint")) + _words(init.get("command")))
    buckets = set(re.findall(r"\bmc\s+mb\b(?:\s+--?[\w-]+)*\s+\w+/([\w.-]+)", script))
    assert buckets, f"minio-init does not create a bucket (mc mb): {script}"
    for name in ("api", "worker-cpu", "worker-gpu"):
        storage = SERVICES[name]["environment"]["MERGEFORGE_STORAGE_URL"]
        assert urlparse(storage).scheme == "s3" and urlparse(storage).netloc in buckets, (name, storage, buckets)
        depends = SERVICES[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
    assert "minio" in (init.get("depends_on") or {})


def test_worker_gpu_reserves_an_nvidia_gpu():
    devices = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_the_workers_consume_every_queue_the_api_routes_to():
    from app.core.config import Settings

    routes = Settings.model_fields["queue_routes"].default_factory()
    needed = {"cpu", *routes.values()}
    queues = {}
    for name in ("worker-cpu", "worker-gpu"):
        words = _words(SERVICES[name]["command"])
        assert "workers.celery_app:celery_app" in words, f"{name} does not run the service's Celery app"
        assert "-Q" in words, f"{name} consumes no explicit queue"
        queues[name] = set(words[words.index("-Q") + 1].split(","))
    consumed = set().union(*queues.values())
    assert needed <= consumed, f"no worker consumes {sorted(needed - consumed)}"
    assert "gpu" in queues["worker-gpu"] and "gpu" not in queues["worker-cpu"], queues
    assert (ROOT / "workers" / "celery_app.py").is_file()


# ------------------------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("name", sorted(BUILT))
def test_dockerfile_exists_and_every_copied_path_exists(name):
    context, dockerfile = _build(BUILT[name])
    assert dockerfile.is_file(), f"{name}: build.dockerfile {dockerfile.relative_to(ROOT)} does not exist"
    copies = [args for keyword, args in _instructions(dockerfile) if keyword in ("COPY", "ADD")]
    assert copies, f"{dockerfile.name} copies nothing into the image"
    for args in copies:
        for source in _copy_sources(args) or []:
            matches = list(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
            assert matches and all(m.exists() for m in matches), f"{dockerfile.name}: COPY {source}: not in the repo"


def _pip_installs(dockerfile: Path) -> list[str]:
    runs = [args for keyword, args in _instructions(dockerfile) if keyword == "RUN"]
    return [cmd for run in runs for cmd in re.split(r"&&|;", run) if "pip install" in cmd]


def test_the_api_image_installs_the_api_extra_without_torch():
    _, dockerfile = _build(SERVICES["api"])
    installs = _pip_installs(dockerfile)
    specs = [w for cmd in installs for w in shlex.split(cmd) if w.startswith(".[")]
    assert specs == [".[api]"], f"{dockerfile.name} installs {specs}, expected only '.[api]'"
    text = dockerfile.read_text(encoding="utf-8").lower()
    assert "torch" not in re.sub(r"#.*", "", text), f"{dockerfile.name} mentions torch outside comments"
    froms = [args for keyword, args in _instructions(dockerfile) if keyword == "FROM"]
    assert all("pytorch" not in f and "cuda" not in f for f in froms), froms
    command = next(args for keyword, args in reversed(_instructions(dockerfile)) if keyword == "CMD")
    target = re.search(r"\bapp\.main:(\w+)", command)
    assert target and "uvicorn" in command, f"{dockerfile.name}: CMD {command} does not serve app.main"
    source = (ROOT / "app" / "main.py").read_text(encoding="utf-8")
    assert re.search(rf"^(def {target[1]}\b|{target[1]}\s*=)", source, re.M), f"app/main.py has no {target[1]}"


def test_the_worker_images_install_the_worker_extra():
    for name in ("worker-cpu", "worker-gpu"):
        _, dockerfile = _build(SERVICES[name])
        specs = [w for cmd in _pip_installs(dockerfile) for w in shlex.split(cmd) if w.startswith(".[")]
        assert specs == [".[worker]"], f"{name}: {dockerfile.name} installs {specs}"


def test_the_api_extra_lists_no_torch():
    names = {_requirement_name(r) for r in _extra("api")}
    assert "torch" not in names, f"the api extra pulls torch: {sorted(names)}"
    assert {"fastapi", "uvicorn", "redis", "celery", "boto3"} <= names, sorted(names)
    assert "torch" not in {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert "torch" in {_requirement_name(r) for r in _extra("worker")}, "the worker extra should bring torch"
