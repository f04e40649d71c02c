"""The wheel inside a host interpreter: the notebook form, the shell form, bad input.

Run by `cargo xtask test` with the python of a fresh venv that has the built `ksrpc-rs`
wheel, the real `ksrpc==0.8.1` package (so ours must not shadow it), numpy and pandas.
Each test serves in a child Python process (as a notebook kernel would) or in this one, and
calls it with the unmodified 0.8.1 client.

Environment (set by xtask): KSRPC_TEST_SERVER_MODULES (bench_mod, capsdk),
KSRPC_TEST_TARGET_DIR (the wheel installed with `pip install --target`) and
KSRPC_TEST_TARGET_PYTHON (a plain interpreter of the same minor, without the wheel).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types

import pytest

import ksrpc_rs
from ksrpc.client import RpcClient
from ksrpc.connections.http import HttpConnection

USERS = {"users": {"u": {"password": "pw", "rules": ["allow ksrpc.server.demo", "allow live_mod",
                                                        "allow bench_mod", "deny *"]}}}
# bench_mod is thread-safe: its barrier tests need two calls at once (other packages run one at a time).
CONFIG = {"server": {"port": 0, "shutdown_grace": 5}, "python": {"parallel_modules": ["bench_mod"]}, **USERS}


def call(url, module, name, *args, user="u", password="pw"):
    async def main():
        conn = HttpConnection(url, username=user, password=password)
        async with conn:
            return await getattr(RpcClient(module, conn), name)(*args)
    return asyncio.run(main())


def gather(url, calls):
    """Each call from a client (a connection) of its own, all at once."""
    async def one(module, name, args):
        conn = HttpConnection(url, username="u", password="pw")
        async with conn:
            return await getattr(RpcClient(module, conn), name)(*args)

    async def main():
        return await asyncio.gather(*(one(m, n, a) for m, n, a in calls))
    return asyncio.run(main())


@pytest.fixture
def server():
    srv = ksrpc_rs.serve(CONFIG)
    yield srv
    srv.stop()


def test_serve_returns_at_once_and_calls_reach_this_interpreter(server):
    assert server.running and server.url.startswith("http://127.0.0.1:")
    # a module this process made at run time (as a notebook cell would)
    # (its functions are defined in it: a function defined elsewhere, say in a cell's
    # __main__, is __main__'s for the capability rule)
    live = types.ModuleType("live_mod")
    exec("import os\nstate = {'logged_in': True}\n"
         "def whoami():\n    return ('pid', os.getpid(), state['logged_in'])\n", live.__dict__)
    sys.modules["live_mod"] = live
    try:
        assert call(server.url, "live_mod", "whoami") == ("pid", os.getpid(), True)
    finally:
        del sys.modules["live_mod"]
    assert call(server.url, "ksrpc.server.demo", "add", 1, 2) == 3
    # the kernel stays usable while it serves
    assert sum(range(10)) == 45


def test_a_function_attached_from_elsewhere_is_refused(server):
    live = types.ModuleType("live_mod")
    live.whoami = lambda: os.getcwd()  # defined in this test module, not in live_mod
    sys.modules["live_mod"] = live
    try:
        with pytest.raises(PermissionError, match="test_in_process"):
            call(server.url, "live_mod", "whoami")
    finally:
        del sys.modules["live_mod"]


def test_the_real_ksrpc_package_is_not_shadowed(server):
    import ksrpc
    import ksrpc.client
    assert "site-packages" in ksrpc.__file__, ksrpc.__file__
    assert call(server.url, "ksrpc.server.demo", "add", 2, 3) == 5
    assert sys.modules["ksrpc.client"] is ksrpc.client


def test_a_dataframe_and_a_refused_module(server):
    df = call(server.url, "ksrpc.server.demo", "test")
    assert list(df["A"]) == [1, 2, 3, 4, 5]
    with pytest.raises(PermissionError):
        call(server.url, "os", "getcwd")


def test_blocking_calls_from_two_clients_run_at_once(server):
    # bench_mod.barrier_wait(2, 10) returns only when two calls wait together
    assert gather(server.url, [("bench_mod", "barrier_wait", (2, 10.0))] * 2) == [True, True]


def test_stop_and_serve_again():
    first = ksrpc_rs.serve(CONFIG)
    url = first.url
    first.stop()
    assert not first.running
    first.stop()  # a second stop is a no-op
    with pytest.raises(Exception):
        call(url, "ksrpc.server.demo", "add", 1, 1)
    second = ksrpc_rs.serve(CONFIG)
    try:
        assert call(second.url, "ksrpc.server.demo", "add", 1, 1) == 2
    finally:
        second.stop()


def test_idle_timeout_stops_the_server():
    srv = ksrpc_rs.serve(CONFIG, idle_timeout=1.0)
    assert call(srv.url, "ksrpc.server.demo", "add", 1, 1) == 2
    assert srv.wait(20), "the idle server did not stop"
    assert not srv.running
    again = ksrpc_rs.serve(CONFIG)  # the idle stop released the process's server slot
    again.stop()


def test_serve_while_one_runs_is_refused(server):
    with pytest.raises(RuntimeError, match="already running"):
        ksrpc_rs.serve(CONFIG)
    assert call(server.url, "ksrpc.server.demo", "add", 1, 1) == 2


def test_a_port_in_use_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=str(port)):
            ksrpc_rs.serve(CONFIG, port=port)
    ksrpc_rs.serve(CONFIG).stop()  # the failed start left nothing behind


@pytest.mark.parametrize("bad, word", [
    ({"server": {"prot": 1}}, "prot"),
    ({"users": {"u": {"password": "x", "rules": ["permit *"]}}}, "rules"),
    ({"python": {"venv": "/tmp/some-venv"}}, "python.venv"),
])
def test_bad_config_is_named(bad, word):
    with pytest.raises((ValueError, RuntimeError), match=word.replace(".", r"\.")):
        ksrpc_rs.serve(bad)
    ksrpc_rs.serve(CONFIG).stop()


def test_python_path_warns(tmp_path):
    with pytest.warns(UserWarning, match="python.path"):
        srv = ksrpc_rs.serve({**CONFIG, "python": {"path": [str(tmp_path)]}})
    srv.stop()


def test_hash_password_makes_a_usable_hash():
    h = ksrpc_rs.hash_password("s3cret")
    assert h.startswith("$argon2id$")
    srv = ksrpc_rs.serve({"server": {"port": 0}, "users": {"h": {"password_hash": h, "rules": ["allow *"]}}})
    try:
        assert call(srv.url, "ksrpc.server.demo", "add", 1, 1, user="h", password="s3cret") == 2
    finally:
        srv.stop()


# ---- the shell forms, in child processes ------------------------------------------------------
def _start_module(python, args, env_extra, cwd=None):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **env_extra)
    proc = subprocess.Popen([python, "-m", "ksrpc_rs", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)
    line = proc.stdout.readline()
    assert line.startswith("ksrpc-server listening on "), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split()[-1]


def _config_file(tmp_path):
    path = tmp_path / "ksrpc.toml"
    path.write_text(textwrap.dedent("""
        [server]
        port = 0
        [users.u]
        password = "pw"
        rules = ["allow ksrpc.server.demo", "deny *"]
    """))
    return path


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_python_dash_m_serves_and_stops_cleanly(tmp_path, stop):
    proc, url = _start_module(sys.executable, ["--config", str(_config_file(tmp_path))], {})
    try:
        assert call(url, "ksrpc.server.demo", "add", 2, 2) == 4
        with pytest.raises(PermissionError):
            call(url, "os", "getcwd")
    finally:
        proc.send_signal(stop)
        assert proc.wait(30) == 0, proc.stderr.read()


def test_files_in_the_current_directory_cannot_replace_the_executor(tmp_path):
    """`python -m` puts the current directory first on sys.path: a `ksrpc_executor.py`
    or `ksrpc_capability.py` there used to be imported instead of the server's own (the
    restricted unpickler, the capability rule). They are served from memory, first; so is
    every module of the `ksrpc_executor` package (a planted package of that name, or a
    planted module of it, is never imported either)."""
    marker = tmp_path / "planted-code-ran"
    plant = f"open({str(marker)!r}, 'w').write('planted')\n"
    for name in ("ksrpc_executor.py", "ksrpc_capability.py"):
        (tmp_path / name).write_text(plant)
    package = tmp_path / "ksrpc_executor"
    package.mkdir()
    for name in ("__init__.py", "names.py", "unpicklers.py", "executor.py", "sharing.py"):
        (package / name).write_text(plant)
    proc, url = _start_module(sys.executable, ["--config", str(_config_file(tmp_path))], {}, cwd=tmp_path)
    try:
        assert call(url, "ksrpc.server.demo", "add", 2, 3) == 5
        with pytest.raises(PermissionError):
            call(url, "os", "getcwd")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read()
    assert not marker.exists(), "a file in the current directory replaced the server's own module"


def test_python_dash_m_without_users_prints_a_password_once(tmp_path):
    proc, url = _start_module(sys.executable, ["--port", "0"], {})
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert err.count("created user `admin` with password") == 1, err
    finally:
        proc.kill() if proc.poll() is None else None


def test_hash_password_command():
    out = subprocess.run([sys.executable, "-m", "ksrpc_rs", "hash-password"], input="pw\n", text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("$argon2id$"), out


def test_installed_with_pip_target_on_pythonpath(tmp_path):
    """`pip install --target DIR wheel`, DIR on PYTHONPATH: both start forms work."""
    target, python = os.environ["KSRPC_TEST_TARGET_DIR"], os.environ["KSRPC_TEST_TARGET_PYTHON"]
    proc, url = _start_module(python, ["--config", str(_config_file(tmp_path))], {"PYTHONPATH": target})
    try:
        assert call(url, "ksrpc.server.demo", "add", 5, 5) == 10
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    script = textwrap.dedent("""
        import base64, json, sys, time, urllib.request
        import ksrpc_rs
        srv = ksrpc_rs.serve(json.loads(sys.argv[1]))
        req = urllib.request.Request(srv.url + "/generate_204")
        req.add_header("Authorization", "Basic " + base64.b64encode(b"u:pw").decode())
        req.add_header("X-Timestamp", str(time.time()))
        print(urllib.request.urlopen(req, timeout=10).status, ksrpc_rs.__file__)
        srv.stop()
    """)
    out = subprocess.run([python, "-c", script, json.dumps(CONFIG)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=target))
    assert out.returncode == 0, out.stderr
    status, where = out.stdout.split()
    assert status == "204" and where.startswith(target), out.stdout


def test_notebook_form_in_a_child_process():
    """A kernel-like child: serve(block=False), keep working, a runtime module, stop, serve again."""
    script = textwrap.dedent("""
        import asyncio, json, sys, types
        import ksrpc_rs
        from ksrpc.client import RpcClient
        from ksrpc.connections.http import HttpConnection
        config = json.loads(sys.argv[1])
        mod = types.ModuleType("live_mod")
        exec("def greet(name):\\n    return 'hi ' + name\\n", mod.__dict__)
        sys.modules["live_mod"] = mod
        async def call(url):
            conn = HttpConnection(url, username="u", password="pw")
            async with conn:
                return await RpcClient("live_mod", conn).greet("cell")
        async def barrier(url):
            async def one():
                conn = HttpConnection(url, username="u", password="pw")
                async with conn:
                    return await RpcClient("bench_mod", conn).barrier_wait(2, 10.0)
            return await asyncio.gather(one(), one())
        for round in range(2):
            srv = ksrpc_rs.serve(config, block=False)
            print(round, asyncio.run(call(srv.url)), flush=True)
            srv.stop()
        srv = ksrpc_rs.serve(config, idle_timeout=1.0)
        print("two blocking calls at once:", asyncio.run(barrier(srv.url)), flush=True)
        print("idle stop:", srv.wait(30), srv.running, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(CONFIG)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=os.environ["KSRPC_TEST_SERVER_MODULES"]))
    assert out.returncode == 0, out.stderr
    # (the 0.8.1 client prints its settings on import)
    assert [line for line in out.stdout.splitlines() if "hi cell" in line] == ["0 hi cell", "1 hi cell"], out.stdout
    assert "two blocking calls at once: [True, True]" in out.stdout, out.stdout
    assert "idle stop: True False" in out.stdout, out.stdout


def test_exiting_with_calls_in_flight_stops_the_server_first():
    """The interpreter exits while a lane call and a coroutine still run: the server is stopped
    at exit (atexit), so no pool thread wakes up into finalization (that crashed with SIGSEGV)."""
    script = textwrap.dedent("""
        import asyncio, json, sys
        import ksrpc_rs
        from ksrpc.client import RpcClient
        from ksrpc.connections.http import HttpConnection
        config = json.loads(sys.argv[1])
        config["users"]["u"]["rules"] = ["allow fakesdk", "allow asyncio", "deny *"]
        async def start(url, module, *args):
            conn = HttpConnection(url, username="u", password="pw")
            async with conn:
                try:
                    await asyncio.wait_for(getattr(RpcClient(module, conn), args[0])(*args[1:]), 0.5)
                except asyncio.TimeoutError:
                    return "left running"
        srv = ksrpc_rs.serve(config)
        print(asyncio.run(start(srv.url, "fakesdk", "block", 20)), flush=True)
        print(asyncio.run(start(srv.url, "asyncio", "sleep", 20)), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(CONFIG)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=os.environ["KSRPC_TEST_SERVER_MODULES"]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("left running") == 2, out.stdout


def test_ctrl_c_stops_a_blocking_serve():
    """serve(block=True) in a script: Ctrl-C stops the server and raises KeyboardInterrupt."""
    script = textwrap.dedent("""
        import json, os, signal, sys, threading
        import ksrpc_rs
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore it)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            ksrpc_rs.serve(json.loads(sys.argv[1]), block=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        srv = ksrpc_rs.serve(json.loads(sys.argv[1]))  # the interrupted server released everything
        print("again", srv.running, flush=True)
        srv.stop()
    """)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(CONFIG)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["interrupted", "again", "True"], out.stdout
