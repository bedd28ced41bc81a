"""Command line: ``python -m sidecar [run] --config FILE`` and ``python -m sidecar validate --config FILE``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading

from sidecar import __version__
from sidecar.config import ConfigError, load_config

log = logging.getLogger("sidecar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otel-sidecar", description="OpenTelemetry sidecar collector for PyTorch inference",
                                epilog="Look at what the file exporter kept: python -m sidecar traces --help")
    p.add_argument("--version", action="version", version=f"otel-sidecar {__version__}")
    p.add_argument("command", nargs="?", choices=("run", "validate"), default="run",
                   help="run the collector (default) or only check the config")
    p.add_argument("--config", "-c", required=True, help="path to the YAML config")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["traces"]:  # the trace viewer has its own sub-commands and options
        from sidecar.cli import main as traces_main
        return traces_main(argv[1:])
    if argv[:1] == ["drift"]:  # drift references: python -m sidecar drift export-reference --from ... --out ...
        from sidecar.drift_cli import main as drift_main
        return drift_main(argv[1:])
    if argv[:1] == ["audit"]:  # the audit trail: python -m sidecar audit query --store URL ...
        from sidecar.audit.cli import main as audit_main
        return audit_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"{args.config}: {len(e.problems)} problem(s):", file=sys.stderr)
        for p in e.located:  # file:line: yaml.path: message
            print(f"  {p}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: OK ({len(config.service.pipelines)} pipelines)")
        return 0
    return run(config)


def run(config) -> int:
    from sidecar.pipeline import Service

    level = config.service.telemetry.logs.level.upper().replace("WARN", "WARNING").replace("WARNINGING", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = Service(config)
        service.start()
    except Exception as e:
        log.error("start-up failed: %s", e)
        return 1
    # What start-up made (modules, config, the pipeline) lives as long as the process: out of the
    # collector's sight, a full collection walks only what requests left behind (benchmarks/gc_stats:
    # 0.18 s of full collections in one default-pipeline benchmark run, 0.05 s frozen).
    gc.freeze()
    # Requests allocate tens of thousands of tracked objects (tail sampling's traces, the scanners' tuples), nearly
    # all freed by their reference counts: a young collection every 10 000 net allocations instead of 700 walks
    # the survivors 20 times less often (benchmarks/gc_stats, the default pipeline's run: 0.038 s of collections
    # instead of 0.062, about 2% of its CPU; a young collection then takes about 2 ms)
    gc.set_threshold(10_000, 10, 10)
    log.info("sidecar ready: pipelines %s", ", ".join(config.service.pipelines))
    print("sidecar ready", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    report = service.shutdown()  # complete: every exporter counted what it still held
    lost = report.lost_in_shutdown
    log.log(logging.ERROR if lost else logging.INFO, "%s", report.line())
    return 1 if lost else 0  # a shutdown that lost acknowledged data is a failure


if __name__ == "__main__":
    sys.exit(main())
