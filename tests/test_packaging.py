"""What the wheel installs: the client package alone, no generic top-level names (README "Packaging")."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("kvstate-*.whl")
    return built


def test_the_wheel_installs_only_the_kvstate_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - dist_info == {"kvstate"}
    assert "kvstate/py.typed" in names
    assert not [name for name in names if name.startswith("kvstate/servers")]  # the harness is devstack's


def test_a_server_command_in_a_client_only_install_says_where_the_component_lives(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -I -S: no PYTHONPATH and no .pth files, so the checkout (the editable install) is not on the path; the
    # environment's site-packages gives nats-py and msgspec only
    script = (
        "import sys; "
        f"sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()['purelib']!r}]; "
        "from kvstate.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    listed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, "archiver"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert run.returncode == 2
    assert "not part of the kvstate wheel" in run.stderr and "Traceback" not in run.stderr
