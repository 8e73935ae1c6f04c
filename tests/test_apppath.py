"""The application's directory is searched after the standard library (``gaspar.apppath``):
a ``json.py`` or ``tempfile.py`` planted next to the application runs nowhere (front end,
workers, the fresh fork server of a reload), and the application's own modules still import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, wait_for

from gaspar import apppath, client

#: A planted module leaves a file named after itself and the process it ran in, then fails.
PLANTED = (
    "import os\n"
    "open(os.path.join({ran!r}, __name__ + '-' + str(os.getpid())), 'w').close()\n"
    "raise RuntimeError('the planted ' + __name__ + '.py ran')\n"
)

APP = """\
import json, os, tempfile  # the standard library's, not the planted ones
import helper  # the application's own module, next to it
import {lib}  # a module of --pythonpath, when given

VERSION = b"v1"


def handle(message):
    import colorsys  # imported here only: in the worker, at its first request
    return json.dumps([colorsys.__file__, tempfile.__file__, helper.NAME, VERSION.decode(), os.getpid()]).encode()
"""


def plant(app_dir, lib: str = "os") -> str:
    """The application in ``app_dir`` beside a planted json, tempfile, colorsys and typing;
    returns the directory where a planted module that runs leaves its mark."""
    ran = app_dir / "ran"
    ran.mkdir(parents=True)
    for name in ("json", "tempfile", "colorsys", "typing"):
        (app_dir / f"{name}.py").write_text(PLANTED.format(ran=str(ran)))
    (app_dir / "helper.py").write_text("NAME = 'helper'\n")
    (app_dir / "app.py").write_text(APP.format(lib=lib))
    return str(ran)


def ask(server) -> list:
    return json.loads(client.request(server.addr, b"x", timeout=10))


def check_reply(reply: list, version: str) -> None:
    colorsys_file, tempfile_file, helper, got, _pid = reply
    stdlib = os.path.dirname(os.__file__)
    assert os.path.dirname(colorsys_file) == stdlib and os.path.dirname(tempfile_file) == stdlib, reply
    assert helper == "helper" and got == version


ENV = {"PYTHONPATH": ROOT}  # gaspar itself; never the application's directory


def test_a_planted_module_runs_nowhere_not_even_after_a_reload(cli, tmp_path):
    app_dir = tmp_path / "app"
    ran = plant(app_dir)
    sock = str(tmp_path / "ctl.sock")
    server = cli("app:handle", "--bind", "127.0.0.1:0", "-w", "2", "--control-socket", sock, env=ENV, cwd=app_dir)
    old = server.wait_ready(2)
    replies = [ask(server) for _ in range(6)]
    for reply in replies:
        check_reply(reply, "v1")
    assert {r[-1] for r in replies} <= set(old)
    (app_dir / "app.py").write_text(APP.format(lib="os").replace('b"v1"', 'b"v2"'))
    server.signal(signal.SIGHUP)  # a fresh fork server, in a fresh interpreter
    assert wait_for(lambda: "Reloaded; replacing the workers" in server.log, 15), server.log
    assert wait_for(lambda: not set(old) & set(server.wait_ready(2)), 15), server.log
    check_reply(ask(server), "v2")
    assert "Cannot start a fresh fork server" not in server.log
    assert os.listdir(ran) == [], server.log


def test_chdir_and_pythonpath(cli, tmp_path):
    app_dir, lib_dir = tmp_path / "app", tmp_path / "lib"
    ran = plant(app_dir, lib="libmod")
    lib_dir.mkdir()
    (lib_dir / "libmod.py").write_text("")
    (lib_dir / "json.py").write_text(PLANTED.format(ran=ran))  # searched after the stdlib too
    args = ("app:handle", "--bind", "127.0.0.1:0", "-w", "1", "--chdir", str(app_dir), "--pythonpath", "../lib")
    server = cli(*args, "--control-socket", "off", env=ENV)
    server.wait_ready(1)
    check_reply(ask(server), "v1")
    old = server.wait_ready(1)
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: not set(old) & set(server.wait_ready(1)), 15), server.log
    check_reply(ask(server), "v1")
    assert os.listdir(ran) == [], server.log


def gaspar_cmd(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", *args], cwd=cwd, env=dict(os.environ, **ENV), capture_output=True, text=True
    )


def test_python_dash_m_gaspar_does_not_search_the_current_directory_first(tmp_path):
    ran = plant(tmp_path / "app")
    done = gaspar_cmd("--version", cwd=tmp_path / "app")
    assert done.returncode == 0 and "gaspar 2" in done.stdout, done.stderr
    assert os.listdir(ran) == []


def test_an_application_module_shadowed_by_the_standard_library_says_so(tmp_path):
    (tmp_path / "colorsys.py").write_text("def handle(m):\n    return m\n")
    done = gaspar_cmd("serve", "colorsys:handle", "--bind", "127.0.0.1:0", cwd=tmp_path)
    assert done.returncode == 2
    assert "has no attribute 'handle'" in done.stderr and "is shadowed by" in done.stderr, done.stderr
    done = gaspar_cmd("serve", "app:handle", "--chdir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "--chdir" in done.stderr and "No such file" in done.stderr, done.stderr


def test_an_application_module_that_fails_to_import_is_not_called_shadowed(tmp_path):
    """A syntax error or an exception at import in the application's own module is said as
    it is, with no advice to rename a module that nothing shadows."""
    (tmp_path / "zz_broken_syntax.py").write_text("def handle(m):\n    return m\ndef broken(:\n")
    (tmp_path / "zz_raises.py").write_text("raise RuntimeError('boom at import')\n")
    for name, said in (("zz_broken_syntax", "SyntaxError"), ("zz_raises", "RuntimeError: boom at import")):
        done = gaspar_cmd("serve", f"{name}:handle", "--bind", "127.0.0.1:0", cwd=tmp_path)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "shadowed" not in done.stderr and "rename" not in done.stderr, done.stderr


# -- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["python", "-m", "gaspar", "serve"], True),
        (["python", "-P", "-m", "gaspar.process.forkserver", "{}"], True),
        (["python", "-mgaspar"], True),
        (["python", "-m", "gaspartan"], False),
        (["python", "-m", "myapp", "gaspar"], False),
        (["gaspar", "serve"], False),
        (["python", "-c", "pass"], False),
    ],
)
def test_runs_gaspar(argv, expected):
    assert apppath.runs_gaspar(argv) is expected


def test_fresh_interpreter_never_searches_the_current_directory(tmp_path):
    """Each form runs the module from a directory holding a planted json.py, and finds
    gaspar even when only the front end's path had it (``-S``: no site-packages here)."""
    (tmp_path / "json.py").write_text("raise SystemExit('planted')\n")
    for version in ((3, 10), (3, 11)):
        argv = apppath.fresh_interpreter("gaspar.process.forkserver", version)
        assert ("-P" in argv) == (version >= (3, 11))
        if version <= sys.version_info[:2]:
            no_site = [argv[0], "-S", *argv[1:], "{}"]
            done = subprocess.run(no_site, cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert "planted" not in done.stderr and "KeyError: 'parent'" in done.stderr, done.stderr


def test_setup_and_adopt(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", ["", "/usr/lib/python3", "/site-packages"])
    monkeypatch.setattr(apppath, "_demoted", False)
    (tmp_path / "lib").mkdir()
    monkeypatch.chdir(tmp_path)
    apppath.setup(chdir="lib", pythonpath=".,..")
    assert os.getcwd() == str(tmp_path / "lib")
    assert sys.path == ["/usr/lib/python3", "/site-packages", str(tmp_path / "lib"), str(tmp_path)]
    apppath.adopt(["/a", "/usr/lib/python3"])
    assert sys.path == ["/a", "/usr/lib/python3", "/site-packages", str(tmp_path / "lib"), str(tmp_path)]
    with pytest.raises(ValueError, match="--pythonpath nope: not a directory"):
        apppath.setup(pythonpath="nope")


def test_a_config_file_may_set_chdir_and_pythonpath_and_the_flags_win(tmp_path, monkeypatch):
    from argparse import Namespace

    from gaspar import cli

    base = [p for p in sys.path if p and not apppath.is_cwd(p)]
    monkeypatch.setattr(sys, "path", list(base))
    monkeypatch.setattr(apppath, "_demoted", True)
    for d in ("app", "lib", "other"):
        (tmp_path / d).mkdir()
    (tmp_path / "conf.py").write_text("chdir = 'app'\npythonpath = '../lib'\ntimeout = 5\n")
    monkeypatch.chdir(tmp_path)
    assert cli.load_app_config(Namespace(config="conf.py", chdir=None, pythonpath=None)) == {"timeout": 5}
    assert os.getcwd() == str(tmp_path / "app")
    assert sys.path[len(base) :] == [str(tmp_path), str(tmp_path / "lib"), str(tmp_path / "app")]
    monkeypatch.chdir(tmp_path)
    sys.path[:] = base
    flags = Namespace(config=str(tmp_path / "conf.py"), chdir="other", pythonpath="")
    assert cli.load_app_config(flags) == {"timeout": 5}
    assert os.getcwd() == str(tmp_path / "other")  # the command line's, not the file's
    assert sys.path[len(base) :] == [str(tmp_path / "other"), str(tmp_path / "lib")]
