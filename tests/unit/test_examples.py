"""The deployment examples stay true to the code: the systemd unit, the container image and compose
file, the example config and docs/kubernetes.md use only real options, stop with the signal the
supervisor treats as a warm stop, and wait longer than the stop grace."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from shardpreempt.cli import main
from shardpreempt.config import load_settings, settings_from_mapping, tomllib
from shardpreempt.process import ExitCode
from shardpreempt.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples" / "systemd" / "shardpreempt@.service"
CONTAINER = ROOT / "examples" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
COMPOSE = CONTAINER / "compose.yaml"
CONFIG = CONTAINER / "shardpreempt.toml"
KUBERNETES = ROOT / "docs" / "kubernetes.md"


# -- what the code and its docs say -------------------------------------------------------------
def run_help_options() -> set[str]:
    """Every option `shardpreempt run --help` lists."""
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", result.output))


def all_options() -> set[str]:
    """Every option of every command, and of the group."""
    opts = {opt for param in main.params if isinstance(param, click.Option) for opt in param.opts}
    for command in main.commands.values():
        opts |= {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts}
    return opts


def default_stop_grace() -> float:
    param = next(p for p in main.commands["run"].params if p.name == "stop_grace")
    return float(param.default)  # type: ignore[arg-type]


def warm_stop_signals() -> set[int]:
    """The signals the README and the supervisor's docstring name as the warm stop (no constant exists)."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"the first (SIG[A-Z]+)(?: or (SIG[A-Z]+))? is a \*\*warm stop\*\*", readme)
    assert found, "the README no longer says which signal is a warm stop"
    from_readme = {signal.Signals[name] for name in found.groups() if name}
    import shardpreempt.supervisor as sup

    found = re.search(r"the first ((?:SIG[A-Z]+/?)+) is a warm stop", sup.__doc__ or "")
    assert found, "the supervisor's docstring no longer says which signal is a warm stop"
    from_code = {signal.Signals[name] for name in found.group(1).split("/")}
    assert from_readme == from_code
    return {int(s) for s in from_code}


def seconds(text: str) -> float:
    """A duration as systemd or compose write it: 45, 45s, 1min 30s, 1m30s, 500ms."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts and all(unit in units for _, unit in parts), f"not a duration: {text!r}"
    return sum(float(n) * units[unit] for n, unit in parts)


def run_arguments(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """Split `... run CONFIG [OPTIONS] -- COMMAND` into its positional arguments and options (before --)."""
    assert "run" in argv, argv
    rest = argv[argv.index("run") + 1:]
    assert "--" in rest, "the command must follow --"
    rest = rest[:rest.index("--")]
    run = main.commands["run"]
    flags = {opt for p in run.params if isinstance(p, click.Option) and p.is_flag for opt in p.opts}
    positional, options, i = [], {}, 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-"):
            name, eq, value = token.partition("=")
            if eq:
                options[name] = value
            elif name in flags:
                options[name] = None
            else:
                i += 1
                options[name] = rest[i] if i < len(rest) else None
        else:
            positional.append(token)
        i += 1
    return positional, options


def local_links(path: Path) -> list[str]:
    """Relative links of a Markdown file that do not resolve (anchors aside)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    return [link for link in links if "://" not in link and not (path.parent / link).exists()]


# -- the supervisor really treats that signal as a warm stop --------------------------------------
def test_the_documented_warm_stop_signal_is_a_warm_stop_in_the_supervisor() -> None:
    """One such signal to a running supervisor is one stop request (warm), and it ends with status 0."""
    for signum in sorted(warm_stop_signals()):
        sent = []

        def tick(sup: Supervisor, signum: int = signum, sent: list[int] = sent) -> None:
            if not sent and sup.worker_pids():
                sent.append(signum)
                signal.raise_signal(signum)

        def worker(index: int, fd: int, parent: int) -> int:
            import time

            time.sleep(20)  # ended by the supervisor's SIGTERM
            return 0

        sup = Supervisor(1, worker, on_tick=tick, tick_every=0.05)
        assert sup.run() == 0
        assert sent == [signum]
        assert (sup.stop_requests, sup.stop_signal) == (1, signum)


# -- container --------------------------------------------------------------------------------------
def dockerfile() -> dict[str, list[str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def test_the_dockerfile_stops_warm_runs_as_a_user_and_execs_shardpreempt() -> None:
    d = dockerfile()
    assert d["FROM"] == ["python:3.11-slim"]
    (stop,) = d["STOPSIGNAL"]
    assert int(signal.Signals[stop]) in warm_stop_signals()
    (entry,) = d["ENTRYPOINT"]
    argv = json.loads(entry)  # exec form: a JSON array, no shell in between to swallow the signal
    assert isinstance(argv, list) and argv[0] == "shardpreempt"
    (user,) = d["USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert any(re.search(r"pip install .*\[redis\]", run) for run in d["RUN"])
    for copy in d["COPY"]:  # built from the repository root: every source exists there
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), source


def test_the_example_config_loads_with_twelve_shards_on_a_server_backend() -> None:
    settings = load_settings(CONFIG)
    assert len(settings.shards) == 12
    assert len({s.identity for s in settings.shards}) == 12
    # three supervisors in three containers: file:// locks would not be shared by them
    assert not settings.backend_url.startswith("file:")


def test_the_compose_file_runs_three_supervisors_of_one_config_with_a_longer_grace() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = doc["services"]
    assert any("redis" in str(s.get("image", "")) for s in services.values())
    supervisors = {name: s for name, s in services.items() if "run" in (s.get("command") or [])}
    assert len(supervisors) == 3
    helped = run_help_options()
    configs = set()
    for name, service in supervisors.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
        positional, options = run_arguments(service["command"])
        assert set(options) <= helped, f"{name}: options run does not have: {set(options) - helped}"
        assert "--backend" not in options  # a password would be in argv
        grace = float(options.get("--stop-grace") or default_stop_grace())
        assert seconds(service["stop_grace_period"]) > grace, name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert positional[0] in mounts, f"{name}: the config is not mounted"
        configs.add((COMPOSE.parent / mounts[positional[0]]).resolve())
        assert not any("SHARDPREEMPT_BACKEND" in str(e) for e in service.get("environment") or [])
    assert configs == {CONFIG.resolve()}


# -- systemd ------------------------------------------------------------------------------------------
def unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_systemd_unit_uses_real_options_and_stops_warm_within_its_timeout() -> None:
    u = unit()
    (exec_start,) = u["Service.ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "shardpreempt"
    positional, options = run_arguments(argv)
    helped = run_help_options()
    assert set(options) <= helped, f"options run does not have: {set(options) - helped}"
    assert len(positional) == 1  # the config
    assert "--backend" not in options and not any("SHARDPREEMPT_BACKEND" in e for e in u.get("Service.Environment", []))
    grace = float(options.get("--stop-grace") or default_stop_grace())
    assert seconds(u["Service.TimeoutStopSec"][-1]) > grace
    assert u["Service.KillMode"] == ["mixed"]  # SIGTERM to the supervisor alone; it stops its workers
    kill = u.get("Service.KillSignal", ["SIGTERM"])[-1]
    assert int(signal.Signals[kill]) in warm_stop_signals()
    assert u["Service.Restart"] == ["on-failure"]
    prevent = {int(code) for value in u["Service.RestartPreventExitStatus"] for code in value.split()}
    assert int(ExitCode.CONFIG) in prevent
    assert int(ExitCode.BACKEND) not in prevent  # an unreachable backend may come back
    assert "Service.StateDirectory" in u
    assert "Service.User" in u or u.get("Service.DynamicUser") == ["yes"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("shardpreempt") is None,
                    reason="needs systemd-analyze and an installed shardpreempt")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """An instance of the template, with ExecStart pointed at the installed shardpreempt (verify checks
    that the program exists), gives no error or warning about the unit."""
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = shlex.split(exec_start.partition("=")[2])[0]
    instance = tmp_path / "shardpreempt@example.service"
    instance.write_text(text.replace(program, str(shutil.which("shardpreempt"))))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)],
                            capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if instance.name in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


# -- Kubernetes and links ---------------------------------------------------------------------------
def test_kubernetes_doc_names_only_real_options() -> None:
    text = KUBERNETES.read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert named, "no option named?"
    assert named <= all_options(), f"not options of shardpreempt: {named - all_options()}"


def test_kubernetes_manifests_parse_and_their_config_loads(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    docs = [d for block in re.findall(r"```yaml\n(.*?)```", KUBERNETES.read_text(), re.S)
            for d in yaml.safe_load_all(block) if d]
    kinds = {d["kind"]: d for d in docs}
    deployment = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = deployment["containers"]
    positional, options = run_arguments(container["args"])
    assert set(options) <= run_help_options()
    assert "--backend" not in options and not container.get("env")
    grace = float(options.get("--stop-grace") or default_stop_grace())
    assert deployment["terminationGracePeriodSeconds"] > grace
    # the config comes from the Secret, its shard list from the ConfigMap (at the mounted paths)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["volumes"]}
    config_volume = next(n for n, p in mounts.items() if positional[0].startswith(p + "/"))
    assert volumes[config_volume]["secret"]["secretName"] == kinds["Secret"]["metadata"]["name"]
    (toml_name,) = kinds["Secret"]["stringData"]
    assert positional[0].endswith("/" + toml_name)
    document = tomllib.loads(kinds["Secret"]["stringData"][toml_name])
    shards_mount = next(p for n, p in mounts.items() if "configMap" in volumes[n])
    for entry in document.get("shard_sets", []):
        if "file" in entry:
            name = entry["file"].removeprefix(shards_mount + "/")
            assert name in kinds["ConfigMap"]["data"], entry["file"]
            (tmp_path / name).write_text(kinds["ConfigMap"]["data"][name])
            entry["file"] = str(tmp_path / name)
    settings = settings_from_mapping(document, "docs/kubernetes.md", base=tmp_path)
    assert settings.shards and not settings.backend_url.startswith("file:")


def test_the_deployment_docs_links_resolve_and_the_readme_links_them() -> None:
    for doc in (KUBERNETES, CONTAINER / "README.md"):
        assert not local_links(doc), (doc, local_links(doc))
    readme = (ROOT / "README.md").read_text()
    for target in ("examples/systemd/shardpreempt@.service", "examples/container/", "docs/kubernetes.md"):
        assert f"]({target}" in readme, target
