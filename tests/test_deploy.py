"""Deployment files are checked by real validators so they never rot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VALIDATE = [sys.executable, "-m", "kubernetes_validate", "--strict"]


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def test_kubernetes_manifests_validate():
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) == 3
    result = run(VALIDATE + manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    broken = (DEPLOY / "k8s" / "transceiver.yaml").read_text().replace("replicas: 2", 'replicas: "two"')
    (tmp_path / "broken.yaml").write_text(broken)
    assert run(VALIDATE + [str(tmp_path / "broken.yaml")]).returncode != 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["splitrelay-edge.service", "splitrelay-transceiver@.service"])
def test_systemd_units_verify(tmp_path, unit):
    # point ExecStart at this checkout's command so verify can check it exists
    text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/splitrelay/.venv/bin/splitrelay",
                                                           str(Path(sys.executable).parent / "splitrelay"))
    name = unit.replace("@.", "@test.")
    (tmp_path / name).write_text(text)
    result = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)])
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if unit.split("@")[0] in line and "EnvironmentFile" not in line]
    assert not problems, problems


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is installed by make setup")
def test_vagrantfile_validates():
    result = run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant", timeout=300)
    assert result.returncode == 0 and "validated successfully" in result.stdout, result.stdout + result.stderr


def test_e2e_script_parses():
    assert run(["bash", "-n", str(ROOT / "vagrant" / "run-e2e.sh")]).returncode == 0


def test_the_edge_daemonset_translates_and_its_arguments_parse(tmp_path):
    """Pods get no route back to clients through the relay, so the DaemonSet must run translation mode;
    and every option it passes must be one `edge serve` takes (the validator cannot see args)."""
    import yaml
    from splitrelay.cli.edge import edge_serve

    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "edge-daemonset.yaml").read_text()))
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["edge", "serve"] and "--translate" in args
    assert "--token-file" in args and "--backend-cidr" in args and "--k8s-insecure" not in args
    (tmp_path / "token").write_text("t" * 64)
    (tmp_path / "hint.key").write_text("0" * 32)
    sample = {"$(POD_CIDR)": "10.244.0.0/16", "$(POD_IP)": "10.0.0.5", "/etc/splitrelay/": f"{tmp_path}/"}
    concrete = []
    for arg in args[2:]:
        for name, value in sample.items():
            arg = arg.replace(name, value)
        concrete.append(arg)
    ctx = edge_serve.make_context("serve", concrete)
    assert ctx.params["translate"] and ctx.params["backend_cidrs"] == ("10.244.0.0/16",)


def test_the_shipped_transceivers_demand_offer_tokens_and_guard_their_admin_listener():
    """A non-loopback WHIP listener without a key would refuse to start (transceiver/service.py); the
    deploy files must ship the key, and an admin listener off loopback only with its token."""
    unit = (DEPLOY / "systemd" / "splitrelay-transceiver@.service").read_text()
    k8s = (DEPLOY / "k8s" / "transceiver.yaml").read_text()
    for text in (unit, k8s):
        assert "--whip-key-file" in text and "--admin-listen" in text and "--insecure-open" not in text
    assert "LoadCredential=whip.key:" in unit
    assert '"--admin-listen", "$(POD_IP):8081", "--admin-token-file"' in k8s   # off loopback: with its token
