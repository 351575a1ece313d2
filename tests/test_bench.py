"""The benchmark suite still runs end to end (smoke profile: seconds), and its arithmetic is right.

Nothing here asserts a speed: CI machines differ.  What must hold on any machine
is that every part measures something real (packets delivered, pings answered,
sessions connected) and that the report says what the figures say.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from splitrelay.bench import report, report_markdown
from splitrelay.bench.capacity import CapacityStep
from splitrelay.bench.report_file import (HEAD_MARKER, KEEP_MARKER, ReportFileError, replace_section,
                                          section_markers)

pytestmark = pytest.mark.lab


def _results(rate_xdp: float, rate_user: float, p99: dict[str, float], scale_pps: list[int],
             setup_ratio: float | None, rate_ceiling: float = 1_100_000) -> dict:
    def path(name: str, pps: float | None) -> dict:
        out = {"latency": {"p50_us": p99[name] / 2, "p99_us": p99[name], "p999_us": p99[name] * 2}}
        if pps is not None:
            out["rate"] = [{"sender_cpu": None, "delivered_pps": pps}, {"sender_cpu": 0, "delivered_pps": pps / 2}]
        return out

    return {"parts": {
        "kernel": path("kernel", None), "xdp": path("xdp", rate_xdp), "userspace": path("userspace", rate_user),
        "ceiling": {"rate": [{"pinned": False, "delivered_pps": rate_ceiling},
                             {"pinned": True, "delivered_pps": rate_ceiling / 2}]},
        "scale": {"runs": [{"flows": 10 ** (3 + 3 * i), "delivered_pps": pps,
                            "active_subset": {"delivered_pps": pps}} for i, pps in enumerate(scale_pps)]},
        "sessions": {"setup": {"ratio_relay_to_direct": {"dtls_connected_ms": setup_ratio}},
                     "setup_2_relays": {"ratio_relay_to_direct": {"dtls_connected_ms": setup_ratio}}},
    }}


def test_targets_are_judged_on_ratios_against_the_floor():
    good = _results(1_000_000, 50_000, {"kernel": 40, "xdp": 42, "userspace": 140}, [900_000, 850_000], 1.02)
    assert [t["met"] for t in report.targets(good)] == [True] * 9
    # added p99: XDP adds 2 µs over the floor, userspace 100 µs -> 0.02
    assert report.ratios(good)["added_p99_us_xdp_over_userspace"] == pytest.approx(0.02)
    missed = report.targets(_results(300_000, 50_000, {"kernel": 40, "xdp": 60, "userspace": 140},
                                     [900_000, 700_000], 1.2, rate_ceiling=400_000))
    assert [t["met"] for t in missed] == [False] * 9


def test_a_part_that_did_not_run_is_not_a_verdict():
    results = {"parts": {"xdp": {"rate": [{"sender_cpu": None, "delivered_pps": 5}]}}}
    assert {t["met"] for t in report.targets(results)} == {None}
    text = report_markdown.markdown(results)
    assert "n/a" in text and "**no**" not in text


@pytest.mark.timeout(600)
def test_smoke_bench_measures_every_part(tmp_path):
    md, plots = tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "bench", "--smoke", "--json",
                           "--markdown", str(md), "--plots", str(plots)],
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout)
    parts = figures["parts"]
    assert set(parts) == {"kernel", "ceiling", "xdp", "userspace", "scale", "sessions", "capacity"}
    for name in ("kernel", "xdp", "userspace"):
        assert parts[name]["latency"]["received"] > 0, name
        assert parts[name]["first_packet"]["received"] > 0, name
    for name in ("kernel", "ceiling", "xdp", "userspace"):
        for run in parts[name]["rate"]:
            assert run["delivered"] > 0 and run["delivered"] <= run["sent"], (name, run)
    for name in ("xdp", "userspace"):
        assert parts[name]["registration"]["register_per_s"] > 0
    assert parts["xdp"]["rate"][0]["xdp_ns_per_packet"] > 0   # the kernel timed the program
    assert [r["flows_in_map"] for r in parts["scale"]["runs"]] == [1000, 10_000]
    assert all(r["delivered"] > 0 for r in parts["scale"]["runs"])
    assert parts["scale"]["bytes_per_flow"] > 0
    for key in ("setup", "setup_2_relays"):
        setup = parts["sessions"][key]
        assert all(setup["paths"][p]["dtls_connected_ms"]["n"] >= 1 for p in ("relay", "direct")), key
    assert parts["sessions"]["capacity"]["steps"]
    echo = parts["capacity"]["profiles"]["echo"]["steps"][0]
    assert echo["rtt_ms_p50"] > 0 and echo["transceiver_cpu"]["us_per_call_s"] > 0
    assert set(figures["ratios"]) >= {"rate_xdp_over_userspace", "added_p99_us_xdp_over_userspace",
                                      "rate_xdp_over_ceiling", "setup_relay_over_direct_2_relays"}
    text = md.read_text()
    for heading in ("## 1. Forwarding rate", "## 2. Added latency", "## 3. First-packet", "## 4. Scale",
                    "## 5. Session setup", "## 6. Transceiver capacity", "## 7. Calls per transceiver core",
                    "## Targets"):
        assert heading in text
    assert {p.name for p in plots.iterdir()} >= {"forwarding-rate.png", "latency-ccdf.png", "scale.png"}


@pytest.mark.parametrize("content", ["not json", "[]", '{"parts": 3}'])
def test_from_results_refuses_what_is_not_a_results_file(tmp_path, content):
    bad = tmp_path / "results.json"
    bad.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "bench", "--from-results", str(bad),
                           "--markdown", str(tmp_path / "B.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is not a results file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "B.md").exists()


# -- the report file: each writer owns its span, nothing else is lost ----------------------------

def _render(results: Path, markdown: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitrelay.cli.main", "bench", "--from-results", str(results),
                           "--markdown", str(markdown)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def saved_results() -> Path:
    """The figures of the last `make bench`, as the repository keeps them."""
    return Path(__file__).resolve().parents[1] / "docs" / "bench" / "results.json"


def test_a_capacity_step_is_written_with_the_keys_the_saved_results_have(saved_results):
    """Steps are dataclasses, written with asdict: their fields, in order, are the results file's keys."""
    step = json.loads(saved_results.read_text())["parts"]["sessions"]["capacity"]["steps"][0]
    assert [f.name for f in fields(CapacityStep)] == list(step)


def test_the_report_replaces_the_tables_and_keeps_the_text_below_the_marker(tmp_path, saved_results):
    md = tmp_path / "B.md"
    md.write_text(f"# old tables\n| stale | 1 |\n\n{KEEP_MARKER}\n\n## Analysis\nhand-written, kept\n")
    for _ in range(2):                                    # a second run changes nothing below the marker
        proc = _render(saved_results, md)
        assert proc.returncode == 0, proc.stderr
        text = md.read_text()
        assert text.startswith("# splitrelay benchmarks\n") and "stale" not in text
        assert text.count(KEEP_MARKER) == 1
        assert text.split(KEEP_MARKER)[1] == "\n\n## Analysis\nhand-written, kept\n"


def test_a_hand_written_head_stays_on_top_and_the_tables_go_a_level_down_below_it(tmp_path, saved_results):
    md = tmp_path / "B.md"
    head = "# splitrelay benchmarks\n\n| figure | measured |\n|---|---|\n| ceiling | 0.985 |\n\n"
    md.write_text(f"{head}{HEAD_MARKER}\n\n# old tables\n\n{KEEP_MARKER}\n\n## Analyses\nkept\n")
    for _ in range(2):                                    # a second run changes neither the head nor the text
        proc = _render(saved_results, md)
        assert proc.returncode == 0, proc.stderr
        text = md.read_text()
        assert text.startswith(head + HEAD_MARKER + "\n\n## The tables of the last `make bench` (generated)\n")
        assert "old tables" not in text and "\n### Targets\n" in text and text.count("\n# ") == 0
        assert text.split(KEEP_MARKER)[1] == "\n\n## Analyses\nkept\n"


def test_the_repository_page_opens_with_its_headline_screen_above_the_generated_tables():
    page = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    head = page.split(HEAD_MARKER)[0]
    assert head.startswith("# splitrelay benchmarks\n") and KEEP_MARKER in page.split(HEAD_MARKER)[1]
    assert len(head.splitlines()) <= 45       # one screen
    rows = [line for line in head.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    # each headline figure: a target, the date and commit it was measured at, a command that reproduces it
    for row in rows:
        assert re.search(r"20\d\d-\d\d-\d\d", row) and re.search(r"`[0-9a-f]{7}`", row), row
        assert re.search(r"`(make |splitrelay |python -m )", row), row
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():          # each commit named is one of this repository's
        for commit in set(re.findall(r"`([0-9a-f]{7})`", head)):
            known = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"])
            assert known.returncode == 0, commit


def test_a_new_report_file_gets_the_marker(tmp_path, saved_results):
    md = tmp_path / "new.md"
    assert _render(saved_results, md).returncode == 0
    assert md.read_text().endswith(f"\n\n{KEEP_MARKER}\n") and "## Targets" in md.read_text()


def test_a_report_file_without_the_marker_is_refused_and_left_as_it_was(tmp_path, saved_results):
    md = tmp_path / "B.md"
    md.write_text("# somebody's notes\n")
    proc = _render(saved_results, md)
    assert proc.returncode == 1 and md.read_text() == "# somebody's notes\n"
    assert proc.stderr == (f"splitrelay: error: {md} exists and has no line {KEEP_MARKER!r}: writing the report "
                           "would lose its text; put that line above the text to keep, or write to a new file\n")


def test_a_section_is_appended_once_then_replaced_in_place(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# page\n\nbefore\n")
    replace_section(md, "bench.x", "## X\nfirst run\n")
    md.write_text(md.read_text() + "\nafter, by hand\n")
    replace_section(md, "bench.x", "## X\nsecond run\n")
    begin, end = section_markers("bench.x")
    assert md.read_text() == f"# page\n\nbefore\n\n{begin}\n## X\nsecond run\n{end}\n\nafter, by hand\n"


def test_a_section_whose_end_marker_is_gone_is_refused_and_left_as_it_was(tmp_path):
    md = tmp_path / "B.md"
    begin, _ = section_markers("bench.x")
    md.write_text(f"{begin}\n## X\nhand edits with the end line deleted\n")
    with pytest.raises(ReportFileError, match="has the line .* but no '<!-- end bench.x -->' after it"):
        replace_section(md, "bench.x", "new")
    assert md.read_text() == f"{begin}\n## X\nhand edits with the end line deleted\n"


@pytest.mark.parametrize("module", ["audio", "failover"])
def test_a_bench_module_refuses_a_bad_into_file_before_measuring(tmp_path, module):
    proc = subprocess.run([sys.executable, "-m", f"splitrelay.bench.{module}", "--section", "--into",
                           str(tmp_path / "missing.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"python -m splitrelay.bench.{module}: error: {tmp_path / 'missing.md'} does not "
                           "exist: run the bench that writes it first\n")


def test_make_bench_writes_its_sections_in_place_and_never_appends():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n")[0]
    assert ">>" not in recipe
    assert recipe.count("--section --into BENCHMARKS.md") == 2 and "--markdown BENCHMARKS.md" in recipe
