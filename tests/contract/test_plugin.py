"""The public testing package as a third party uses it: the pytest plugin, the contract suite on a backend
``open_backend`` does not know, and imports on a machine without pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardpreempt.testing.fixtures import Servers, start_server
from shardpreempt.testing.servers import EphemeralServer, ServerUnavailable

#: Runs before the code under test: every import of pytest fails as it does where pytest is not installed.
WITHOUT_PYTEST = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pytest", "_pytest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_PYTEST + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_the_contract_module_imports_without_pytest_and_running_it_names_the_extra() -> None:
    """shardpreempt.testing.contract imports without pytest (its helpers work); what needs pytest says which
    extra to install, and so does importing the plugin."""
    done = _python("""
        import shardpreempt.testing
        from shardpreempt.testing import contract
        assert "pytest" not in sys.modules
        assert issubclass(contract.BackendContract, object) and contract.new_owner("x").startswith("x-")
        with contract.Opener("memory://ns") as open_:
            assert open_().try_acquire(["k"], contract.new_owner(), 30) is not None
        try:
            contract.pytest.raises
        except ImportError as exc:
            print("contract:", exc)
        try:
            import shardpreempt.testing.fixtures
        except ImportError as exc:
            print("plugin:", exc)
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["contract", "plugin"], done.stdout
    assert all("pip install 'shardpreempt[test]'" in line for line in lines), done.stdout


def test_a_missing_server_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """No binary: the test is skipped, or failed when CI is set; an unknown kind without a factory is an error."""

    def unavailable() -> EphemeralServer:
        raise ServerUnavailable("nosuchd is not installed")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nosuch: nosuchd is not installed"):
        start_server("nosuch", unavailable)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        Servers().started("nosuch", unavailable)
    with pytest.raises(ValueError, match="no built-in test server for 'nosuch'"):
        Servers().started("nosuch")


MY_BACKEND = '''
"""A third-party backend: its own scheme, opened by its own function (the file backend underneath)."""
from shardpreempt.backends import open_backend

def open_mine(url, **options):
    assert url.startswith("mine://"), url
    return open_backend("file://" + url[len("mine://"):], **options)
'''

THIRD_PARTY_TESTS = '''
import pytest
from shardpreempt.testing.contract import BackendContract
from shardpreempt.testing.servers import unique

@pytest.fixture
def backend_name():
    return "mine"

@pytest.fixture
def backend_server():
    return None

@pytest.fixture
def backend_url(tmp_path):
    return f"mine://{tmp_path}/{unique()}"

class TestMine(BackendContract):
    opener = "mybackend:open_mine"
    hammer_seconds = 0.3

def test_the_plugins_opener_takes_options_and_other_urls(open_, tmp_path):
    assert open_(f"file://{tmp_path}/other", poll=0.5).poll == 0.5
'''

UNNAMED_TESTS = '''
def test_without_a_backend_name(open_):
    pass
'''

SESSION_SERVER_TESTS = '''
import pytest

SEEN = []

@pytest.fixture
def backend_name():
    return "redis"

def test_kills_the_session_server(backend_server, open_):
    assert open_().try_acquire(["k"], "o", 30) is not None
    SEEN.append(backend_server)
    backend_server.kill()

def test_the_next_test_gets_it_running_again(backend_server, open_, shardpreempt_servers):
    assert backend_server is SEEN[0] and list(shardpreempt_servers) == ["redis"]
    assert backend_server.proc.poll() is None
    assert open_().try_acquire(["k"], "o", 30) is not None  # a fresh namespace, free
'''


def _pytest_in(path: Path, *args: str) -> str:
    """The output of a pytest run in ``path`` with the plugin enabled (what it printed so far if it timed out)."""
    (path / "conftest.py").write_text('pytest_plugins = ["shardpreempt.testing.fixtures"]\n')
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *args],
                              capture_output=True, text=True, timeout=240, cwd=path)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"pytest in {path} timed out:\n{out[-5000:]}")
    return done.stdout


@pytest.mark.timeout(300)
def test_a_third_party_backend_runs_the_contract_suite_with_the_plugin(tmp_path: Path) -> None:
    """A backend open_backend does not know runs the contract suite through its ``opener``: in the test process,
    in the holder it SIGKILLs and in the spawned racing processes; the plugin's open_ passes options and other
    URLs; a missing backend_name says what to do."""
    (tmp_path / "mybackend.py").write_text(MY_BACKEND)
    (tmp_path / "test_mine.py").write_text(THIRD_PARTY_TESTS)
    (tmp_path / "test_unnamed.py").write_text(UNNAMED_TESTS)
    out = _pytest_in(tmp_path, "-k", "acquire_gives or killed_holder or exclusivity or opener or backend_name")
    for test in ("test_killed_holder_frees_its_keys", "test_exclusivity_between_processes",
                 "test_the_plugins_opener_takes_options_and_other_urls"):
        assert f"{test} PASSED" in out, out[-5000:]
    assert "test_without_a_backend_name ERROR" in out and "define a fixture backend_name" in out, out[-5000:]
    assert "failed" not in out.splitlines()[-1] and "1 error" in out.splitlines()[-1], out[-5000:]


@pytest.mark.timeout(300)
def test_the_session_server_is_started_again_after_a_test_killed_it(tmp_path: Path) -> None:
    """One server per kind per session; a test that kills it leaves the next test a running one."""
    pytest.importorskip("redis")
    (tmp_path / "test_session.py").write_text(SESSION_SERVER_TESTS)
    out = _pytest_in(tmp_path, "test_session.py")
    if "redis-server is not installed" in out and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed")
    assert "2 passed" in out.splitlines()[-1], out[-3000:]
