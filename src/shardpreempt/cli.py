"""The ``shardpreempt`` console script: run, plan, status, layout, init, timeline, demo, stress."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from . import __version__, logs
from .backends import open_backend
from .config import Settings, apply_overrides, load_settings
from .errors import BackendUnavailable, ConfigError, CrashLoop, ShardPreemptError
from .process import EXIT_BACKEND, EXIT_CONFIG, EXIT_CRASH_LOOP
from .slicing import STRATEGIES, make_slices

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    if logs.json_active():
        logs.fatal(message)
    else:
        click.echo(f"shardpreempt: error: {message}", err=True)
    sys.exit(code)


def _guard(fn: Callable[[], int]) -> None:
    """Run a command, turning our errors into one line and an exit status (no traceback)."""
    try:
        code = fn()
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except CrashLoop as exc:
        _fail(str(exc), EXIT_CRASH_LOOP)
    except BackendUnavailable as exc:
        _fail(f"backend unavailable: {exc}", EXIT_BACKEND)
    except ShardPreemptError as exc:
        _fail(str(exc), 1)
    sys.exit(code)


def _settings(config: str, backend: str | None = None, ttl: float | None = None, strategy: str | None = None,
              slices: int | None = None, workers: int | None = None, **run: Any) -> Settings:
    return apply_overrides(load_settings(config), backend=backend, ttl=ttl, strategy=strategy, slices=slices,
                           workers=workers, **run)


def config_options(*, backend: bool = True) -> Callable[[F], F]:
    """Options shared by the commands that read a config (``--backend`` only where one is used)."""
    options = [
        click.option("-w", "--workers", type=click.IntRange(min=1), default=None,
                     help="Local worker processes (default: [run] workers or 1)."),
        click.option("--strategy", type=click.Choice(list(STRATEGIES)), default=None,
                     help="Slicing strategy (overrides [slicing] strategy)."),
        click.option("--slices", type=click.IntRange(min=1), default=None,
                     help="The pool's slice count (default: the pool's recorded one, else the worker count)."),
    ]
    if backend:
        options.insert(1, click.option("--backend", "backend", default=None, metavar="URL",
                                       help="Backend URL (overrides [backend] url)."))

    def apply(fn: F) -> F:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


common = config_options()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shardpreempt")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Split shards into slices and let worker processes preempt them: one owner per shard."""
    logs.setup(verbose)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path(dir_okay=False))
@common
@click.option("--ttl", type=float, default=None, help="Lease time in seconds (overrides [backend] ttl).")
@click.option("--once", is_flag=True, help="Process every slice exactly once, then end the run.")
@click.option("--events", "events", type=click.Path(dir_okay=False), default=None, help="Append JSON events here.")
@click.option("--max-failures", type=click.IntRange(min=1), default=5, show_default=True,
              help="Failed runs in a row before a slice is given up.")
@click.option("--backoff", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="First delay after a failed run (doubles).")
@click.option("--crash-limit", type=click.IntRange(min=1), default=5, show_default=True,
              help="Quick deaths in a row that stop the run.")
@click.option("--hang-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Kill a worker silent this long (default: 0.35 x ttl on servers, 10 s on file).")
@click.option("--stop-grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds a command may take to exit after SIGTERM (handoff, warm stop) before it is killed.")
@click.option("--interval", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Least seconds between the starts of two successful runs on a slice (the seed's cron cadence).")
@click.option("--jitter", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Add a random delay up to this many seconds to each interval.")
@click.option("--start-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long to keep trying an unreachable backend at start before exit status 4.")
@click.option("--name", default=None, metavar="NAME",
              help="This supervisor's name in member identities host/NAME.INDEX (default: its pid).")
@click.option("--metrics", "metrics_address", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (overrides [run] metrics; "
                   "needs the 'metrics' extra).")
@click.option("--log-format", type=click.Choice(list(logs.FORMATS)), default=None,
              help="stderr as text lines or one JSON object per line (overrides [run] log_format; default text).")
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def run(ctx: click.Context, config: str, workers: int | None, backend: str | None, strategy: str | None,
        slices: int | None, ttl: float | None, once: bool, events: str | None, max_failures: int, backoff: float,
        crash_limit: int, hang_timeout: float | None, stop_grace: float, interval: float, jitter: float,
        start_timeout: float, name: str | None, metrics_address: str | None, log_format: str | None,
        command: Sequence[str]) -> None:
    """Supervise workers that join the pool and run COMMAND for each slice they hold (put it after --)."""
    from . import metrics
    from .poller import Poller
    from .supervisor import Supervisor

    verbose = ctx.find_root().params.get("verbose", 0)
    logs.setup(verbose, log_format or "text", run=True)  # a config error is a JSON line already with the flag

    def go() -> int:
        settings = _settings(config, backend, ttl, strategy, slices, workers, metrics=metrics_address,
                             log_format=log_format)
        logs.setup(verbose, settings.log_format, run=True)
        if name is not None and (not name or any(c in name for c in ":/\0 ")):
            raise ConfigError("must be non-empty, without ':', '/' or spaces", source="command line", key="--name")
        server = metrics.serve(settings.metrics) if settings.metrics else None

        def start_line(sup: Supervisor) -> None:  # the supervisor's first tick comes before its first worker
            sup.on_tick = None  # once only: the supervisor then sleeps as long as it would without a tick
            logs.start_line(layout=poller.layout, url=poller.backend_url, workers=poller.worker_count,
                            events=events, metrics=server.address if server else None)

        poller = Poller(settings, command=list(command), once=once, events=events, max_failures=max_failures,
                        backoff=backoff, hang_timeout=hang_timeout, crash_limit=crash_limit,
                        stop_grace=stop_grace, name=name, start_timeout=start_timeout, interval=interval,
                        jitter=jitter, on_tick=start_line)
        poller.set_worker_count(settings.workers or 1)
        try:
            return poller.poll()
        finally:
            metrics.uninstall()

    _guard(go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@config_options(backend=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(config: str, workers: int | None, strategy: str | None, slices: int | None, as_json: bool) -> None:
    """Show the layout this config asks for and its slices, without touching a backend."""
    from .pool import Layout

    def go() -> int:
        settings = _settings(config, None, None, strategy, slices, workers)
        count = settings.slice_count(settings.workers or 1)
        layout = Layout.of(settings.shards, settings.strategy, count)
        cut = make_slices(settings.shards, count, settings.strategy)
        if as_json:
            click.echo(json.dumps({"layout": layout.public(),
                                   "slices": [{"index": s.index, "id": s.id, "shards": s.digest} for s in cut]},
                                  indent=2))
            return 0
        click.echo(f"layout: {layout}")
        if settings.slices is None:
            click.echo("  (no slice count configured: a pool on a backend keeps the count it recorded first; "
                       "`shardpreempt status` shows it)")
        for s in cut:
            click.echo(f"  slice {s.index} [{s.id}]: " + ", ".join(sh.name for sh in s.shards))
        return 0

    _guard(go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option("--limit", type=int, default=200, show_default=True, help="Rows shown in the table.")
def status(config: str, workers: int | None, backend: str | None, strategy: str | None, slices: int | None,
           as_json: bool, watch: bool, interval: float, limit: int) -> None:
    """Every shard: owner, token, time left; free ones in red."""
    from rich.console import Console
    from rich.live import Live

    from .pool import Layout, recorded_layout
    from .status import snapshot, table

    def go() -> int:
        settings = _settings(config, backend, None, strategy, slices, workers)
        if settings.backend_url.lower().startswith("file:"):
            from .backends.file import directory_of

            where = directory_of(settings.backend_url)
            if not where.is_dir():  # status only looks: it must not create a lock directory
                raise ConfigError(f"no lock directory {str(where)!r}: nothing has run with this backend yet",
                                  source=settings.redacted_url())
        store = open_backend(settings.backend_url)
        try:
            asked = Layout.of(settings.shards, settings.strategy, settings.slice_count(settings.workers or 1))
            pool = recorded_layout(store)
            # Show the pool's slices when it was cut from these shards, else what this config asks for.
            use = pool if pool is not None and pool.fingerprint == asked.fingerprint else asked
            cut = make_slices(settings.shards, use.slices, use.strategy)

            def take() -> dict[str, Any]:
                return snapshot(store, cut, asked)

            if as_json and not watch:
                snap = take()
                # indented for people; compact above 1,000 shards, where the indenting encoder (pure
                # Python) cost a second per 100,000 rows
                click.echo(json.dumps(snap, indent=2 if len(snap["shards"]) <= 1000 else None))
                return 0
            if not watch:
                Console().print(table(take(), limit))
                return 0
            if as_json:  # one JSON object per line, for machines following along
                try:
                    while True:
                        click.echo(json.dumps(take(), separators=(",", ":")))
                        time.sleep(interval)
                except KeyboardInterrupt:
                    return 0
            with Live(table(take(), limit), auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(table(take(), limit), refresh=True)
                except KeyboardInterrupt:
                    return 0
        finally:
            store.close()

    _guard(go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@common
@click.option("--apply", "apply_", is_flag=True,
              help="Record this config's layout as the pool's (only while the pool has no live members).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def layout(config: str, workers: int | None, backend: str | None, strategy: str | None, slices: int | None,
           apply_: bool, as_json: bool) -> None:
    """Show the pool's recorded layout beside this config's, or change it with --apply."""
    from .pool import Layout, apply_layout, check_identities, recorded_layout
    from .status import members

    def go() -> int:
        settings = _settings(config, backend, None, strategy, slices, workers)
        check_identities(settings.shards)
        store = open_backend(settings.backend_url)
        try:
            pool = recorded_layout(store)
            count = settings.slices if settings.slices is not None else (
                pool.slices if pool is not None else settings.workers or 1)
            asked = Layout.of(settings.shards, settings.strategy, count)
            if apply_:
                live = members(store)
                if live:
                    names = ", ".join(f"{m.identity} (pid {m.pid})" for m in live[:10])
                    raise ConfigError(f"the pool has {len(live)} live member(s): {names}; stop their supervisors "
                                      "(a warm stop releases at once), then apply the new layout",
                                      source=store.url)
                apply_layout(store, asked)
                pool = asked
            if as_json:
                click.echo(json.dumps({"pool": pool.public() if pool else None, "config": asked.public()}, indent=2))
            else:
                click.echo(f"pool:   {pool if pool is not None else 'no layout recorded'}")
                click.echo(f"config: {asked}")
                if apply_:
                    click.echo("recorded this config's layout as the pool's")
            return 0
        finally:
            store.close()

    _guard(go)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option("--backend", "backend", default=None, metavar="URL", help="Backend URL (instead of a config).")
def init(config: str | None, backend: str | None) -> None:
    """Prepare the backend: SQL tables and schema; a new Redis namespace marked new (no restart grace)."""

    def go() -> int:
        if backend is not None:
            url = backend
        elif config is not None:
            url = load_settings(config).backend_url
        else:
            raise ConfigError("give a CONFIG or --backend URL", source="command line")
        store = open_backend(url)
        try:
            setup = getattr(store, "init", None)
            if setup is not None:
                setup()
            click.echo(f"initialised {store.url}")
        finally:
            store.close()
        return 0

    _guard(go)


@main.command()
@click.argument("events", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="timeline.html", show_default=True,
              help="The HTML file to write.")
@click.option("--by", type=click.Choice(["auto", "shard", "slice", "worker"]), default="auto", show_default=True,
              help="One lane per shard, per slice or per worker (auto: per slice above 200 shards).")
@click.option("--title", default="shardpreempt timeline", show_default=True, help="The page's title.")
def timeline(events: Sequence[str], output: str, by: str, title: str) -> None:
    """Draw who owned which shard when, from --events files, as one self-contained HTML page."""
    from .timeline import write_timeline

    def go() -> int:
        try:
            count = write_timeline(events, output, by=by, title=title)
        except (ValueError, KeyError, TypeError) as exc:  # a line that is not one of our events
            raise ConfigError(f"not an events file ({type(exc).__name__}: {exc})", source=", ".join(events)) from None
        except OSError as exc:
            raise ConfigError(f"cannot write {output!r}: {exc.strerror}", key="--output") from None
        click.echo(f"{output}: {count} events")
        return 0

    _guard(go)


@main.command()
@click.option("-w", "--workers", type=int, default=3, show_default=True)
@click.option("--shards", "shard_count", type=int, default=6, show_default=True)
@click.option("--items", type=int, default=150, show_default=True, help="Work items per shard.")
@click.option("--backend", "backend", default=None, metavar="URL",
              help="Backend URL (default: file locks in the demo dir).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help="Keep the demo files here.")
@click.option("--no-kill", is_flag=True, help="Do not kill a worker midway.")
@click.option("--keep", is_flag=True,
              help="Keep the temporary directory (databases, locks, events, timeline); removed by default.")
def demo(workers: int, shard_count: int, items: int, backend: str | None, directory: str | None,
         no_kill: bool, keep: bool) -> None:
    """Local SQLite shards, several workers, a kill midway, an exactly-once check and a timeline."""
    from .demo import run_demo

    _guard(lambda: run_demo(workers=workers, shards=shard_count, items=items, backend=backend,
                            directory=directory, kill=not no_kill, keep=keep))


@main.command()
@click.option("--backend", default="file", show_default=True,
              help="file, a server name (redis, postgresql, mysql, etcd, zookeeper: started from its binary), "
                   "or a URL.")
@click.option("--faults", "count", type=int, default=20, show_default=True, help="How many faults to inject.")
@click.option("--duration", type=float, default=None, help="Stop injecting after this many seconds.")
@click.option("--kinds", default=None, help="Comma-separated fault kinds (default: all that apply).")
@click.option("--ttl", type=float, default=2.0, show_default=True)
@click.option("--shards", "shard_count", type=int, default=6, show_default=True)
@click.option("--workers", type=int, default=3, show_default=True, help="Workers per supervisor.")
@click.option("--supervisors", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help="Keep the run's files here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--network", is_flag=True,
              help="Run each supervisor in its own network namespace (root, Linux) and add the "
                   "partition-worker and slow-backend faults.")
@click.option("--fork", "fork_mode", default=None, metavar="MODE",
              help="The forking workload: each command forks the processes that do the work (group, "
                   "session or mixed; default: $SHARDPREEMPT_STRESS_FORK, else none).")
def stress(backend: str, count: int, duration: float | None, kinds: str | None, ttl: float, shard_count: int,
           workers: int, supervisors: int, seed: int, directory: str | None, as_json: bool,
           network: bool, fork_mode: str | None) -> None:
    """Run a backend under injected faults, then check the history and the shards."""
    from pathlib import Path

    from rich.console import Console

    from .testing.stress import FAULTS, SERVER_BACKENDS, Stress, StressOptions  # a proving tool: loaded here only
    from .testing.workload import FORK_MODES

    def go() -> int:
        chosen = tuple(k.strip() for k in kinds.split(",")) if kinds else tuple(FAULTS)
        if any(k not in FAULTS for k in chosen):
            raise ConfigError(f"unknown fault kind in {kinds!r} (known: {', '.join(FAULTS)})", source="--kinds")
        if min(count, shard_count, workers, supervisors) < 1 or ttl <= 0:
            raise ConfigError("--faults, --shards, --workers, --supervisors must be >= 1 and --ttl > 0",
                              source="command line")
        if fork_mode is not None and fork_mode not in FORK_MODES:
            raise ConfigError(f"unknown fork mode {fork_mode!r} (known: {', '.join(FORK_MODES)})", source="--fork")
        if network and backend not in SERVER_BACKENDS:
            raise ConfigError(f"--network needs a server the harness starts: {', '.join(SERVER_BACKENDS)}",
                              source="--network")
        opts = StressOptions(backend=backend, kinds=chosen, count=count, duration=duration, ttl=ttl,
                             shards=shard_count, workers=workers, supervisors=supervisors, seed=seed,
                             network=network, directory=Path(directory) if directory else None,
                             fork_children=fork_mode, log=lambda line: click.echo(line, err=True))
        result = Stress(opts).run()
        figures = result.as_dict()
        if as_json:
            click.echo(json.dumps(figures, indent=2))
        else:
            items = result.items
            console = Console()
            console.print(f"[bold]stress[/bold] {result.backend}: {result.faults_total} faults {result.faults}")
            console.print(f"acquisitions {result.acquisitions}, overlaps {result.overlaps}, "
                          f"token violations {result.token_violations}, max unowned after a fault "
                          f"{result.max_unowned_s} s (bound {result.unowned_bound_s} s), "
                          f"coverage timeouts {result.coverage_timeouts}")
            console.print(f"items {items.items}: processed {items.processed}, lost {items.lost}, "
                          f"duplicated {items.duplicated}, unauthorised writes {items.unauthorised}, "
                          f"stale writes accepted {items.stale_accepted}, late writes {items.late_writes}; "
                          f"processes that outlived their lease {result.outlived}")
            if "network" in figures:
                console.print(f"network: {figures['network']}", highlight=False)
            for line in result.violations:
                console.print(f"[red]{line}[/red]", highlight=False)
        return 0 if result.passed else 1

    _guard(go)
