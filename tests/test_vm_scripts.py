"""The VM scripts' contracts that need no VM: they parse, --help teaches, bad input is one line and an
exit code, and no libvirt network the Vagrantfile defines can forward off the host.

The VMs themselves are exercised by `make vm-check` (CI: the kernel matrix) and `make vm-test` (the full run)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["vm-box.sh", "vm-libvirt.sh", "vm-test.sh", "vm-matrix.sh", "vm-deps.sh", "vm-matrix-guest.sh",
           "vm-check.sh"]


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_vm_script_parses(script):
    result = run(["bash", "-n", str(ROOT / "scripts" / script)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ["vm-box.sh", "vm-libvirt.sh", "vm-test.sh", "vm-matrix.sh", "vm-check.sh"])
def test_vm_script_help_shows_usage_and_an_example_or_the_commands(script):
    result = run(["bash", str(ROOT / "scripts" / script), "--help"])
    assert result.returncode == 0 and result.stdout.startswith("Usage:"), result.stdout + result.stderr


def test_unknown_release_is_refused_in_one_line_with_exit_2():
    result = run(["bash", str(ROOT / "scripts" / "vm-box.sh"), "buster"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "unknown release buster" in result.stderr


def test_unknown_option_is_refused_in_one_line_with_exit_2():
    result = run(["bash", str(ROOT / "scripts" / "vm-box.sh"), "--fast"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_every_vagrant_network_is_isolated_and_none_is_public():
    text = (ROOT / "vagrant" / "Vagrantfile").read_text()
    assert ":public_network" not in text and "forwarded_port" not in text
    assert 'management_network_mode = "none"' in text
    modes = re.findall(r'libvirt__forward_mode:\s*"(\w+)"', text)
    assert modes and set(modes) == {"none"}, modes
