"""A relay's defaults are written once (splitrelay/defaults.py) and its policies once (bpf/splitrelay.h).

Before, port 3478 was typed five times, 8470 four times, "strict" eight times, and a routing policy
was a string compared in six files (issue 21).  These tests fail when one comes back, and check the
deploy files, which cannot import the module, against it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from splitrelay import defaults
from splitrelay.bpf import consts

ROOT = Path(__file__).resolve().parent.parent
CODE = ("splitrelay", "wire", "bpf", "edge", "transceiver", "client", "lab", "cli", "bench", "voice")


def retyped_defaults() -> list[str]:
    """Every literal 3478, 8470 or policy name in the code, outside splitrelay/defaults.py."""
    wanted = {defaults.RELAY_PORT, defaults.CONTROL_PORT}
    out = []
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "splitrelay" / "defaults.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Constant):
                    continue
                if (type(node.value) is int and node.value in wanted) or node.value in consts.POLICIES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return out


def test_no_module_retypes_a_default_port_or_a_policy_name():
    assert retyped_defaults() == []


def test_the_policies_are_the_headers_list():
    header = (ROOT / "bpf" / "splitrelay.h").read_text()
    defined = dict(re.findall(r"#define\s+SR_POLICY_(\w+)\s+(\d+)", header))
    assert consts.POLICIES == {name.lower(): int(value) for name, value in defined.items()}
    assert [p.value for p in consts.Policy] == list(consts.POLICIES) == defaults.POLICY_NAMES
    assert consts.Policy.HINT == "hint" and defaults.POLICY == "strict"


def test_the_cli_offers_the_planes_the_agent_builds():
    from splitrelay.edge.agent import PLANES

    assert tuple(PLANES) == defaults.PLANE_KINDS and defaults.PLANE in PLANES


def test_the_deploy_files_name_the_default_ports():
    daemonset = (ROOT / "deploy" / "k8s" / "edge-daemonset.yaml").read_text()
    assert f'"--port", "{defaults.RELAY_PORT}"' in daemonset
    assert f"containerPort: {defaults.RELAY_PORT}," in daemonset
    assert f"containerPort: {defaults.CONTROL_PORT}," in daemonset
    assert f':{defaults.CONTROL_PORT}", "--token-file"' in daemonset
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert f':{defaults.CONTROL_PORT}"]' in prometheus
