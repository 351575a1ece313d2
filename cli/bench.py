"""`splitrelay bench`: measure the XDP relay against the userspace relay and kernel routing, in one run."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
from splitrelay.bench.suite import PARTS
from splitrelay.cli.errors import EXIT_DEPENDENCY, CliError, require_bcc, require_root

PARTS_HELP = ("floor: kernel routing (the latency floor); ceiling: a bare XDP program that only rewrites MACs "
              "and redirects (the local ceiling's rate); xdp / userspace: rate, latency, first packet, "
              "registration through each relay; scale: 1k/100k/1M flows; sessions: WebRTC setup time (1 and 2 "
              "relays advertised) and the old aiortc-client capacity; capacity: calls per transceiver core per "
              "profile (echo, conversation, voice) with the libdatachannel load client, ramped until the audio "
              "round trip grows 20 ms or loss passes 1 %.")


@click.command("bench")
@click.option("--smoke", is_flag=True,
              help="Seconds instead of minutes: every part runs briefly (what CI runs); figures are not "
                   "meaningful.")
@click.option("--part", "parts", multiple=True, metavar="PART",
              type=click.Choice(list(PARTS)),
              help="Run only these parts (repeat). Default: all. " + PARTS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON on stdout.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report (e.g. BENCHMARKS.md): the tables above its line "
                   "'<!-- make bench writes everything above this line ... -->', the text below kept as it is.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG plots into this directory (linked from the report).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path),
              help="Also save the raw figures as JSON here.")
@click.option("--from-results", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Measure nothing: render the report (and the plots, but for the RTT distribution, which "
                   "needs the raw samples) from figures saved earlier with --results.")
def bench(smoke: bool, parts: tuple[str, ...], as_json: bool, markdown: Path | None, plots: Path | None,
          results: Path | None, from_results: Path | None) -> None:
    """Benchmark the relay paths side by side and print the ratios.

    \b
    Builds its own lab (network namespaces and veths, removed after), runs the
    C load generator (bench/udpgen, built by `make setup`) and real aiortc
    clients, and prints XDP ÷ userspace ratios and the performance targets.
    Progress goes to stderr.

    \b
    Examples:
      splitrelay bench --smoke --json                  # CI: seconds
      splitrelay bench --part xdp --part userspace     # just the two relays
      splitrelay bench --part capacity --json          # calls per transceiver core
      make bench                                       # all of it, writes BENCHMARKS.md
    """
    from splitrelay.bench import report, report_file, report_plots

    if markdown:
        report_file.check_writable(markdown)    # before minutes of measuring, not after
    if from_results:
        try:
            figures = json.loads(from_results.read_text())
        except ValueError as exc:
            raise CliError(f"{from_results} is not a results file: {exc}") from None
        if not isinstance(figures, dict) or not isinstance(figures.get("parts"), dict):
            raise CliError(f"{from_results} is not a results file: no \"parts\" object (save one with --results)")
        figures["ratios"] = report.ratios(figures)      # the report's current rules, on the old figures
        figures["targets"] = report.targets(figures)
        if plots:  # redraw what the figures hold; the RTT distribution needs the raw samples: kept as drawn
            report_plots.plots(figures, from_results.parent / "no-samples", plots)
        written = sorted(plots.glob("*.png")) if plots and plots.is_dir() else []
        _write_report(figures, markdown, plots, written)
        _emit(figures, as_json)
        return
    require_root("benchmarking (namespaces, XDP)")
    require_bcc()
    from splitrelay.bench import loadgen, suite

    try:
        loadgen.udpgen_path()
    except loadgen.LoadgenError as exc:
        raise CliError(str(exc), EXIT_DEPENDENCY) from None

    def say(message: str) -> None:
        click.echo(f"bench: {message}", err=True)

    with tempfile.TemporaryDirectory(prefix="srbench-samples-") as samples_name:
        samples = Path(samples_name)
        try:
            figures = suite.run("smoke" if smoke else "full", tuple(parts) or suite.PARTS, samples, say)
        except (suite.BenchError, loadgen.LoadgenError) as exc:
            raise CliError(str(exc)) from None
        figures["ratios"] = report.ratios(figures)
        figures["targets"] = report.targets(figures)
        written: list[Path] = []
        if plots:
            written = report_plots.plots(figures, samples, plots)
        if results:
            suite.save(figures, results)
        _write_report(figures, markdown, plots, written)
    _emit(figures, as_json)


def _write_report(figures: dict, markdown: Path | None, plots: Path | None, written: list[Path]) -> None:
    from splitrelay.bench import report_file, report_markdown

    if not markdown:
        return
    rel = None
    if plots:
        try:
            rel = str(plots.resolve().relative_to(markdown.resolve().parent))
        except ValueError:
            rel = str(plots.resolve())
    report_file.write_generated(markdown, report_markdown.markdown(figures, written, rel))
    linked = f" linking {len(written)} plots in {plots}" if plots else ""
    click.echo(f"bench: wrote {markdown}{linked}", err=True)


def _emit(figures: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        _summary(figures)


def _summary(figures: dict) -> None:
    out = sys.stdout
    for name, value in figures["ratios"].items():
        if value is not None:
            out.write(f"{name:40s} {value:10.3f}\n")
    for t in figures["targets"]:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.write(f"{verdict:6s} {t['target']} (measured {t['measured']})\n")
    capacity = figures.get("parts", {}).get("capacity") or {}
    if capacity:
        from splitrelay.bench import capacity_load
    for name, r in capacity.get("profiles", {}).items():
        bound = ("" if not r["lower_bound"] else " (lower bound: no step failed)" if not r["capacity_reached"]
                 else f" (lower bound: {capacity_load.WHO_LIMITED[r['limited_by']]})")
        out.write(f"capacity {name:13s} {r['capacity']:4d} calls per core{bound}; "
                  f"{r['marginal_us_per_call_s']} µs CPU per call-second; stopped: {r['stopped_because']}\n")
    for name, why in capacity.get("skipped", {}).items():
        out.write(f"capacity {name:13s} not run: {why}\n")
