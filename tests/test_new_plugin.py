"""``gatewayd new-plugin``: what it refuses, and that each generated package works as generated.

The integration test generates one package per transport into a temporary directory, installs
all four into one new venv, and then, per package and in parallel: lints it with ruff, runs its
own tests, checks its ``sample.yaml``, starts its simulator alone, and runs ``gatewayd demo``
with a copy of the sample (free ports) until the plugin's readings are in the SQLite sink.

The venv sees this environment's packages (gatewayd, pytest, hypothesis...) through a ``.pth``
line that adds this environment's site-packages: ``--system-site-packages`` would expose the
base interpreter's, not this venv's. Installing needs no network: pip runs without build
isolation, which needs ``wheel`` (or setuptools >= 70.1) here; without it the test installs the
package itself the way an editable install does (a ``.pth`` path and a dist-info with the entry
points from ``pyproject.toml``).
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from gatewayd.scaffold import TRANSPORTS, ScaffoldError, check_name, generate
from gatewayd.testing import free_port, free_udp_port

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).with_name("ruff")
STDLIB_DISTUTILS = {"SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def run(args: list[str], cwd: Path | None = None, timeout: float = 60, **env: str) -> str:
    """Run a command; its output, or a failure showing it."""
    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{output}"
    return output


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Weather", "my-meter", "2fast", "a__b", "x_", "class", "esam"])
def test_a_bad_name_is_refused(name: str) -> None:
    with pytest.raises(ScaffoldError):
        check_name(name)


def test_the_command_refuses_a_bad_name_and_a_non_empty_directory(tmp_path: Path) -> None:
    def new_plugin(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "gatewayd", "new-plugin", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    refused = new_plugin("My-Meter")
    assert refused.returncode == 2 and "invalid plugin name 'My-Meter'" in refused.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    refused = new_plugin("meter", "--dir", "taken")
    assert refused.returncode == 2 and "not overwriting" in refused.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    assert new_plugin("meter", "--dir", "empty").returncode == 0  # an empty one is fine
    assert new_plugin("meter").returncode == 0  # default: ./gatewayd-meter
    assert (tmp_path / "gatewayd-meter" / "gatewayd_meter" / "plugin.py").exists()


# --- the generated packages, installed -------------------------------------------------------


def make_venv(where: Path) -> Path:
    """A venv seeing this environment's packages; returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(where)])
    python = where / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    ours = sysconfig.get_path("purelib")
    Path(purelib.strip(), "_parent_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def can_build_offline() -> bool:
    import setuptools

    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return importlib.util.find_spec("wheel") is not None or version >= (70, 1)


def install(python: Path, packages: list[Path]) -> None:
    """``pip install --no-deps --no-build-isolation -e`` each package (offline)."""
    if can_build_offline():
        editable = [arg for package in packages for arg in ("-e", str(package))]
        pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        # stdlib distutils: setuptools' own cannot take over in a site added by a .pth line
        run(pip + ["--disable-pip-version-check", *editable], timeout=120, **STDLIB_DISTUTILS)
        return
    code = "import site; print(site.getsitepackages()[0])"
    site = Path(run([str(python), "-c", code]).strip())
    for package in packages:  # what pip's editable install amounts to
        project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
        module = project["name"].replace("-", "_")
        (site / f"__editable__.{module}.pth").write_text(f"{package}\n")
        info = site / f"{module}-{project['version']}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        )
        points = project["entry-points"]["gatewayd.plugins"]
        lines = "".join(f"{name} = {target}\n" for name, target in points.items())
        (info / "entry_points.txt").write_text(f"[gatewayd.plugins]\n{lines}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """``(venv python, transport -> package dir)``, one package per transport, installed."""
    root = tmp_path_factory.mktemp("new-plugin")
    packages = {t: generate(f"ci_{t}", t, root / f"gatewayd-ci_{t}")[0].parent for t in TRANSPORTS}
    python = make_venv(root / "venv")
    install(python, list(packages.values()))
    return python, packages


def demo_config(package: Path, transport: str, work: Path) -> Path:
    """The package's sample.yaml with free ports, a private link path and ``work`` as state."""
    config = yaml.safe_load((package / "sample.yaml").read_text())
    config["api"]["listen"] = f"127.0.0.1:{free_port()}"
    (plugin,) = config["plugins"].values()
    if transport == "tcp":
        plugin["listen"] = f"127.0.0.1:{free_port()}"
    elif transport == "udp":
        plugin["listen"] = f"127.0.0.1:{free_udp_port()}"
    elif transport == "mqtt":
        plugin["broker"]["port"] = free_port()  # the simulator starts a mosquitto there
    else:
        plugin["port"] = str(work / "device")
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def exercise(python: Path, transport: str, package: Path) -> int:
    """Everything a user does with a fresh package; returns the readings the demo stored."""
    name = f"ci_{transport}"
    gatewayd = [str(python), "-m", "gatewayd"]
    run([str(RUFF), "check", "--no-cache", "."], cwd=package)
    run([str(RUFF), "format", "--check", "--no-cache", "."], cwd=package)
    run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package, timeout=120)
    assert "ok" in run([*gatewayd, "check-config", "-c", "sample.yaml"], cwd=package)
    assert "--interval" in run([*gatewayd, "simulate", name, "--help"])
    work = package.parent / f"work-{transport}"
    work.mkdir()
    alone = ["--link", str(work / "alone")] if transport == "serial" else []
    run([*gatewayd, "simulate", name, "--duration", "1", *alone], timeout=30)
    config = demo_config(package, transport, work)
    state = work / "state"
    demo = [*gatewayd, "demo", "-c", str(config), "--duration", "6", "--state-dir", str(state)]
    run(demo, timeout=60, XDG_RUNTIME_DIR=str(work))
    with sqlite3.connect(state / "events.db") as db:
        query = "SELECT count(*) FROM events WHERE protocol = ? AND type = 'reading'"
        return db.execute(query, (name,)).fetchone()[0]


@pytest.mark.integration
def test_each_generated_package_passes_its_tests_and_runs_in_the_demo(installed) -> None:
    python, packages = installed
    with ThreadPoolExecutor(max_workers=len(packages)) as pool:
        stored = {
            transport: pool.submit(exercise, python, transport, package)
            for transport, package in packages.items()
        }
        readings = {transport: future.result() for transport, future in stored.items()}
    assert all(count > 0 for count in readings.values()), readings
