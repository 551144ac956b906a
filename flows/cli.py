"""medpipe: process medical imaging archives in batch (DICOM to OME-Zarr, filters, segmentation, inference, reports).

Exit status of ``medpipe run`` (docs/cli.md): 0 every study ok, skipped or deferred, 1 one or more
studies failed (listed on stderr and in run.json), 2 bad usage or configuration, 3 the run itself
failed (missing archive, invalid model, output folder locked by another run, PACS credentials refused).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from medpipe import __version__
from medpipe.outputs import EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, exit_code


def console() -> None:
    """The ``medpipe`` command: :func:`main`, then an exit that skips the interpreter's teardown.

    Every output is written (atomically) before :func:`main` returns, and every exit handler
    (Prefect's log flush among them) has run by then; what is left, freeing the objects of
    Prefect, Dask and TensorFlow one by one, costs seconds and changes nothing on disk.
    """
    status = [EXIT_RUN_FAILED]  # an exception escaping main(): its traceback is printed, then this
    atexit.register(_exit_now, status)  # first registered, so it runs after every other exit handler
    try:
        status[0] = main()
    except SystemExit as exc:  # argparse's usage errors, --help, --version, a refused configuration
        status[0] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    sys.exit(status[0])


def _exit_now(status: list[int]) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not change the exit status
            pass
    os._exit(status[0])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medpipe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"medpipe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and Dask's logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="process an archive or a PACS (embedded Prefect, local Dask cluster)",
                         description="Process every study of SOURCE into OUT. " + __doc__.split("\n\n")[1])
    run.add_argument("archive", metavar="SOURCE", help=_SOURCE_HELP)
    run.add_argument("--out", type=Path, required=True, help="output folder (see docs/output-contract.md)")
    _cluster_args(run)
    run.add_argument("--force", action="store_true", help="reprocess studies that are unchanged")
    _pacs_args(run)
    run.add_argument("--send", action="append", metavar="DEST", default=None,
                     help="send SEG/SR back to this PACS (URL as for SOURCE; repeatable; docs/pacs.md)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="list studies and series found, and what would be processed")
    plan.add_argument("archive", metavar="SOURCE", help=_SOURCE_HELP)
    plan.add_argument("--config", type=Path, help="YAML/JSON/TOML configuration file")
    plan.add_argument("--out", type=Path, default=None,
                      help="PACS: the output folder whose watermark starts the window (read only)")
    _pacs_args(plan)
    plan.set_defaults(func=cmd_plan)

    sample = sub.add_parser("sample-archive", help="write the sample archive (MR, CT phantom, real files)")
    sample.add_argument("dest", type=Path)
    sample.set_defaults(func=cmd_sample)

    train = sub.add_parser("train", help="train the default model on generated phantom data")
    train.add_argument("--out", type=Path, default=None, help="model folder (default: the packaged model)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate the model on a labelled archive")
    ev.add_argument("archive", type=Path)
    ev.add_argument("--labels", type=Path, required=True, help="CSV or JSON: study UID or key -> 0/1")
    ev.add_argument("--out", type=Path, default=Path("evaluation"))
    ev.add_argument("--config", type=Path)
    ev.set_defaults(func=cmd_evaluate)

    serve = sub.add_parser("serve", help="serve the archive flow as a nightly Prefect deployment")
    serve.add_argument("--archive", required=True, metavar="SOURCE", help=_SOURCE_HELP)
    serve.add_argument("--send", action="append", metavar="DEST", default=None,
                       help="send SEG/SR back to this PACS every night (repeatable; docs/pacs.md)")
    serve.add_argument("--out", type=Path, required=True)
    serve.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    serve.add_argument("--cron", default=None, help="cron schedule (default from config: 0 2 * * *)")
    serve.add_argument("--timezone", default=None, help="IANA time zone of the schedule (default UTC)")
    serve.add_argument("--port", type=int, default=4200, help="port of the embedded Prefect server and UI")
    serve.add_argument("--allow-out-root", type=Path, action="append", metavar="DIR",
                       help="a folder runs may also write under (repeatable; default: only --out)")
    _cluster_args(serve)
    serve.set_defaults(func=cmd_serve)

    schema = sub.add_parser("report-schema", help="print the JSON Schema of report.json")
    schema.set_defaults(func=cmd_report_schema)
    return p


_SOURCE_HELP = ("folder of DICOM files (any nesting), or a PACS: dicomweb+http(s)://HOST:PORT/PATH "
                "or dimse://CALLED_AET@HOST:PORT (see docs/pacs.md)")


def _date(text: str) -> dt.date:
    """An argparse type: ``YYYY-MM-DD``."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date of the form YYYY-MM-DD") from None


def _pacs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_date, metavar="YYYY-MM-DD",
                   help="PACS: studies from this date on (overrides the watermark; a backfill)")
    p.add_argument("--until", type=_date, metavar="YYYY-MM-DD", help="PACS: studies up to this date (inclusive)")
    p.add_argument("--max-studies", type=int, metavar="N", help="PACS: at most N studies this run")


def is_pacs_url(source: str) -> bool:
    """Whether SOURCE names a PACS (a URL) rather than a folder.

    >>> is_pacs_url("dimse://ORTHANC@pacs:4242"), is_pacs_url("/data/archive")
    (True, False)
    """
    return "://" in str(source)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML/JSON/TOML configuration file")
    p.add_argument("--workers", type=int, help="Dask worker processes of the local cluster (default 2)")
    p.add_argument("--cluster", choices=["local", "cuda"], help="local processes, or one worker per GPU")
    p.add_argument("--dask-address", help="tcp://HOST:PORT of an existing Dask scheduler")


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted, not to the stream
    it was when the handler was made (a progress display or a test may replace and close that)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 (StreamHandler.__init__ sets it)
        pass


def _quiet(verbose: bool) -> None:
    """Keep the terminal to progress and results unless --verbose (workers inherit this)."""
    level = "INFO" if verbose else "WARNING"
    # Only the console handler is quietened: the Prefect UI keeps every run's full logs.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", level.lower())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    ours = logging.getLogger("medpipe")
    for old in [h for h in ours.handlers if isinstance(h, _CurrentStderr)]:
        ours.removeHandler(old)  # main() called again in one process: one handler, not one per call
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.propagate = False


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    cluster: dict[str, Any] = {}
    if getattr(args, "workers", None) is not None:  # 0 is refused by the configuration, not ignored
        cluster["workers"] = args.workers
    if getattr(args, "cluster", None):
        cluster["kind"] = args.cluster
    if getattr(args, "dask_address", None):
        cluster.update(kind="address", address=args.dask_address)
    out: dict[str, Any] = {"cluster": cluster} if cluster else {}
    source: dict[str, Any] = {}
    for name in ("since", "until"):
        if getattr(args, name, None) is not None:
            source[name] = getattr(args, name).isoformat()
    if getattr(args, "max_studies", None) is not None:
        source["max_studies"] = args.max_studies
    archive = getattr(args, "archive", None)
    if archive is not None and is_pacs_url(archive):
        source["url"] = archive
    if source:
        out["source"] = source
    if getattr(args, "send", None):
        out["send"] = {"destinations": list(args.send)}
    return out


def _load_config(args: argparse.Namespace):
    from medpipe.config import Config
    from medpipe.errors import ConfigError

    try:
        return Config.load(getattr(args, "config", None), overrides=_overrides(args))
    except ConfigError as exc:
        print(f"medpipe: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _check_source(args: argparse.Namespace, cfg: Any) -> str | None:
    """The problem with SOURCE, --send, --since/--until for a usage error (exit 2), or None."""
    from medpipe.errors import MedpipeError

    pacs = is_pacs_url(args.archive)
    if not pacs and not Path(args.archive).is_dir():
        return f"{args.archive}: archive folder not found"
    since, until = getattr(args, "since", None), getattr(args, "until", None)
    if since and until and since > until:
        return f"--since {since} is after --until {until}"
    if not pacs and (since or until or getattr(args, "max_studies", None) is not None):
        return "--since, --until and --max-studies apply to a PACS source, not to a folder"
    from medpipe.pacs.address import PacsAddress

    for url in ([args.archive] if pacs else []) + list(getattr(args, "send", None) or []):
        try:
            PacsAddress.parse(url)
        except (MedpipeError, ValueError) as exc:
            return str(exc)
    if pacs and cfg.source.since is None:
        from tasks.pacs import no_watermark_text, watermark_problem

        out = getattr(args, "out", None)
        return no_watermark_text(args.archive, "(no --out given)") if out is None else watermark_problem(cfg, out)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # fail on a bad configuration before starting anything
    problem = _check_source(args, cfg)
    if problem:
        print(f"medpipe: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not args.force and not is_pacs_url(str(args.archive)):
        quiet = _nothing_new(args, cfg)
        if quiet is not None:
            return quiet
    from contextlib import ExitStack

    from flows.server import prefect_api

    from .stopping import RunInterrupted
    from .terminal import RunDisplay

    started: dict[str, Any] = {}
    cluster = ExitStack()

    def start_beside_server() -> None:  # what the run needs besides the server, while it starts
        from flows.archive import process_archive
        from flows.cluster import started_cluster

        started["flow"] = process_archive
        started["cluster"] = cluster.enter_context(started_cluster(cfg.cluster))

    with RunDisplay() as display, cluster, prefect_api(meanwhile=start_beside_server), cluster:
        # (the inner `cluster`: it closes before the server stops, so its workers' last logs reach it)
        display.note(f"Prefect API: {os.environ.get('PREFECT_API_URL')}")
        try:
            run = started["flow"](archive=str(args.archive), out=str(args.out),
                                  config=cfg.model_dump(mode="json"), force=args.force,
                                  dask_address=started["cluster"])
        except RunInterrupted as exc:
            display.fail(f"run {exc}; run.json records what was done ({args.out / 'run.json'})")
            return exc.exit_status
        except Exception as exc:
            from tasks.pacs import failure_message

            usage, text = failure_message(exc)
            display.fail(text)
            return EXIT_USAGE if usage else EXIT_RUN_FAILED
    display.summary(run, args.out)
    return exit_code(run["studies"])


def _nothing_new(args: argparse.Namespace, cfg: Any) -> int | None:
    """A night with nothing new ends here, its record written, before any server or cluster starts
    (:func:`medpipe.run_plan.nothing_new`); None when there is work (or anything to report: the
    flow then runs and says it)."""
    from medpipe.access import check_out_folder
    from medpipe.errors import MedpipeError
    from medpipe.run_plan import nothing_new

    try:
        check_out_folder(str(args.out), cfg.run.allowed_out_roots)
        run = nothing_new(args.archive, args.out, cfg)
    except (MedpipeError, OSError, ValueError) as exc:  # the flow reports it as a run's failure
        logging.getLogger("medpipe").debug("no quick check of %s: %s", args.out, exc)
        return None
    if run is None:
        return None
    from .terminal import RunDisplay

    with RunDisplay() as display:
        display.note("nothing new: no study to process (each unchanged since its last successful run, or unusable; "
                     "no cluster or Prefect flow started)")
    display.summary(run, args.out)
    return exit_code(run["studies"])


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from medpipe.ingest import format_plan, plan_studies, scan_archive

    problem = _check_source(args, cfg)
    if problem:
        print(f"medpipe: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if is_pacs_url(args.archive):
        return _plan_pacs(args, cfg)
    args.archive = Path(args.archive)
    from medpipe.errors import ModelError
    from medpipe.inference.model import resolve_model

    scan = scan_archive(args.archive, cfg.ingest)
    try:  # which model would run on which study
        models = [resolve_model(m) for m in cfg.inference_models() if m.enabled]
    except ModelError as exc:  # the plan of the archive is still worth printing
        print(f"medpipe: models not shown: {exc}", file=sys.stderr)
        models = []
    print(format_plan(plan_studies(scan, cfg.ingest), scan.issues, models))
    return EXIT_OK


def _plan_pacs(args: argparse.Namespace, cfg: Any) -> int:
    """``medpipe plan`` on a PACS: query only (nothing is retrieved or written)."""
    from tasks.pacs import failure_message, format_pacs_plan, plan_source

    try:
        plan = plan_source(cfg, args.out)
    except Exception as exc:
        usage, text = failure_message(exc)
        print(f"medpipe: {text}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_RUN_FAILED
    print(format_pacs_plan(plan))
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from medpipe.sample import write_sample_archive

    summary = write_sample_archive(args.dest)
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from medpipe.inference.train import train_default

    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.epochs:
        kwargs["epochs"] = args.epochs
    out = args.out
    if out is None:
        from medpipe.inference.model import DEFAULT_MODEL

        out = DEFAULT_MODEL.parent
    card = train_default(out, **kwargs)
    print(json.dumps(card.get("metrics", card), indent=2, default=str))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from medpipe.inference.evaluate import evaluate_archive

    result = evaluate_archive(args.archive, args.labels, args.out, cfg)
    print(json.dumps(result.get("metrics", result), indent=2, default=str))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from flows.deployment import serve

    return serve(args, cfg)


def cmd_report_schema(args: argparse.Namespace) -> int:
    from medpipe.report import report_schema

    print(json.dumps(report_schema(), indent=2))
    return EXIT_OK


if __name__ == "__main__":
    console()
