"""Build the offline bundle for an air-gapped PC: one tarball, installed with ``./install.sh``.

    python3 packaging/bundle.py [--python 3.10] [--extras data-service] [--arch x86_64]
                                [--glibc 2.35] [--out dist]

Run it from a checkout on a machine with network (any Python >= 3.10 with pip); it writes
``dist/inboxd-<version>-py<python>-<arch>[-<extras>].tar.gz`` holding:

* ``wheels/``: the inboxd wheel (built from this checkout) and one wheel per dependency for the
  target Python and platform, downloaded with ``pip download --require-hashes`` against the
  lock file(s): ``requirements.lock``, plus ``requirements-<extra>.lock`` for each extra;
* ``requirements.txt``: the lock's pins that apply to the target (markers evaluated for it, not
  for this machine), with the lock's hashes, plus the inboxd wheel's hash;
* ``install.sh``: ``./install.sh [--prefix /opt/inboxd] [--python python3]`` makes a venv and
  installs with ``--no-index --require-hashes``: no network, every file hash-checked;
* ``share/``: the systemd unit, the sysusers file, the example config, README and LICENSE
  (``inboxd install-files`` writes the same from the installed package).

Wheels only (``--only-binary :all:``): an air-gapped PC has no compiler. Linux wheels are
taken up to manylinux ``--glibc`` (default 2.35: Ubuntu 22.04, the oldest supported
distribution), so the bundle installs on every newer one too. README "Air-gapped PCs".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

try:  # the maintained library when it is installed (the dev venv has it) ...
    from packaging.markers import Marker
except ImportError:  # ... else the copy every pip carries: this script needs pip anyway
    from pip._vendor.packaging.markers import Marker  # type: ignore[assignment]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the shipped files' list, from the package (standard library only)
from daemon.commands.install_files import SHIPPED  # noqa: E402

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
#: the first glibc with manylinux wheels per architecture (manylinux1 / manylinux2014)
_FIRST_GLIBC = {"x86_64": 5, "aarch64": 17}


class BundleError(Exception):
    """What stopped the build, said so a person can act on it."""


def main(argv: list[str] | None = None) -> int:
    """Build the bundle; 0 on success, else one line on stderr and 1."""
    args = _parser().parse_args(argv)
    try:
        tarball = build(args.python, _extras(args.extras), args.arch, args.glibc, args.out)
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    size = tarball.stat().st_size
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    print(f"{tarball} ({size / 1e6:.1f} MB)\nsha256 {digest}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packaging/bundle.py", description=__doc__.split("\n\n", 1)[0])
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    p.add_argument(
        "--python",
        default=here,
        choices=SUPPORTED,
        help=f"the target PC's Python (default: this one, {here})",
    )
    p.add_argument(
        "--extras",
        default="",
        help="comma-separated extras to include, e.g. data-service (default: none)",
    )
    p.add_argument("--arch", default=os.uname().machine, choices=sorted(_FIRST_GLIBC))
    p.add_argument(
        "--glibc",
        default="2.35",
        help="the oldest glibc to install on (default 2.35, Ubuntu 22.04)",
    )
    p.add_argument("--out", type=Path, default=REPO / "dist", help="folder for the tarball")
    return p


def _extras(text: str) -> list[str]:
    return sorted({e.strip() for e in text.split(",") if e.strip()})


def build(python: str, extras: list[str], arch: str, glibc: str, out: Path) -> Path:
    """Build the bundle and return the tarball's path."""
    locks = [REPO / "requirements.lock"] + [REPO / f"requirements-{e}.lock" for e in extras]
    known = sorted(
        p.name[len("requirements-") : -len(".lock")]
        for p in REPO.glob("requirements-*.lock")
        if p.name != "requirements-dev.lock"
    )
    for lock, extra in zip(locks[1:], extras, strict=True):
        if not lock.is_file():
            raise BundleError(f"no extra {extra!r}: the extras are {', '.join(known)}")
    env = _environment(python, arch)
    with tempfile.TemporaryDirectory(prefix="inboxd-bundle-") as tmp:
        wheel = _build_wheel(Path(tmp) / "build")
        version = wheel.name.split("-")[1]
        name = f"inboxd-{version}-py{python}-{arch}" + "".join(f"-{e}" for e in extras)
        stage = Path(tmp) / name
        wheels = stage / "wheels"
        wheels.mkdir(parents=True)
        shutil.copy2(wheel, wheels)
        pins = "".join(_applicable(lock.read_text(), env) for lock in locks)
        requirements = stage / "requirements.txt"
        requirements.write_text(
            f"# inboxd {version} for Python {python} on {arch} Linux (glibc >= {glibc})"
            f"{', extras: ' + ', '.join(extras) if extras else ''}\n"
            f"# from {', '.join(lock.name for lock in locks)} (markers evaluated for that "
            "Python), hashes as locked\n" + pins
        )
        _download(requirements, wheels, python, arch, glibc)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        with requirements.open("a") as fh:
            fh.write(f"inboxd=={version} --hash=sha256:{digest}\n")
        _write_install_script(stage / "install.sh", python)
        share = stage / "share"
        share.mkdir()
        for target, source in SHIPPED.items():
            shutil.copy2(REPO / source, share / target)
        out.mkdir(parents=True, exist_ok=True)
        tarball = out / f"{name}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(stage, arcname=name, filter=_owned_by_root)
    return tarball


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _environment(python: str, arch: str) -> dict[str, str]:
    """The marker variables of the target (PEP 508), for CPython on Linux."""
    minor = python.split(".")[1]
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.99",
        "os_name": "posix",
        "platform_machine": arch,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        # a patch release that is above every x.y.0 marker bound the locks could hold
        "python_full_version": f"3.{minor}.99",
        "python_version": python,
        "sys_platform": "linux",
    }


_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+==[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def _applicable(lock: str, env: dict[str, str]) -> str:
    """The requirement blocks of ``lock`` whose marker holds in ``env``, without the marker.

    pip evaluates a lock's markers for the Python running it, not for ``--python-version``:
    so a bundle for 3.10 made on 3.11 would miss ``tomli``. Here they are evaluated for the
    target instead, and the file in the bundle has none left."""
    kept: list[str] = []
    keep = False
    for line in lock.splitlines():
        if line[:1].isspace():  # a block's hashes, then uv's "# via" notes
            if keep and line.strip().startswith("--hash="):
                kept.append(line.rstrip())  # the block's last hash has no "\\" already
            continue
        match = _PIN.match(line)
        keep = match is not None and (
            match["marker"] is None or Marker(match["marker"]).evaluate(env)
        )
        if match is not None and keep:
            kept.append(f"{match['name']} \\")
    return "".join(f"{line}\n" for line in kept)


def _build_wheel(where: Path) -> Path:
    where.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(where), str(REPO)])
    (wheel,) = where.glob("inboxd-*.whl")
    return wheel


def _platforms(arch: str, glibc: str) -> list[str]:
    major, _, minor = glibc.partition(".")
    if major != "2" or not minor.isdigit():
        raise BundleError(f"--glibc {glibc!r}: give a version such as 2.35")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(_FIRST_GLIBC[arch], int(minor) + 1)]
    # The legacy names PyPI still uses for the same glibc floors.
    legacy = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
    tags += [f"{n}_{arch}" for n, m in legacy.items() if _FIRST_GLIBC[arch] <= m <= int(minor)]
    return [*tags, "linux_" + arch, "any"]


def _download(requirements: Path, wheels: Path, python: str, arch: str, glibc: str) -> None:
    abi = "cp" + python.replace(".", "")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--implementation=cp",
        f"--python-version={python}",
        f"--abi={abi}",
        "--abi=abi3",
        "--abi=none",
        "--dest",
        str(wheels),
        "-r",
        str(requirements),
    ]
    command += [f"--platform={tag}" for tag in _platforms(arch, glibc)]
    _run(command)


def _run(command: list[str]) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = "\n".join(
            line for line in done.stderr.splitlines() if "is ignored" not in line
        ).strip()
        raise BundleError(f"{' '.join(command[2:4])} failed:\n{said}")


def _write_install_script(path: Path, python: str) -> None:
    template = (REPO / "packaging" / "install.sh").read_text()
    path.write_text(template.replace("@PYTHON@", python))
    path.chmod(0o755)


if __name__ == "__main__":
    sys.exit(main())
