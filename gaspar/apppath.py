"""Where the application's modules are found: after the standard library, never before it.

Python puts the current directory first on ``sys.path`` when it runs ``python -m MODULE``
or ``python -c``, and gaspar used to insert it there too, as gunicorn does. Then a file
named like a standard module in the application's directory (a ``tempfile.py``, a
``json.py``) replaced that module in the daemon: its code ran in the front end, in every
worker and in the fresh fork server a reload starts. So here:

* :func:`demote_cwd` removes the entry Python's start-up put first when it is the current
  directory (``''`` or its path); ``gaspar/__init__.py`` calls it as soon as ``python -m
  gaspar`` imports the package, before any other import, and :func:`gaspar.cli.main` again;
* :func:`setup` (``--chdir DIR``, ``--pythonpath DIRS``) changes directory first, then
  *appends* the given directories and the application's directory (the current one, after
  ``--chdir``) to ``sys.path``: the standard library and installed packages come first;
* a fresh fork server starts with :func:`fresh_interpreter` (``python -P`` on 3.11+, and a
  ``-c`` whose first statement drops ``''`` for 3.10) and then takes the front end's
  ``sys.path`` as it is (:func:`adopt`).

**Honest limits.** ``PYTHONPATH`` is the operator's own choice and is left where Python puts
it (before the standard library). ``python -m gaspar`` imports ``runpy`` before gaspar's own
code runs, from the current directory if there is a ``runpy.py`` there: use the ``gaspar``
command or ``python -P -m gaspar``, which never search it first. An application module named
like a standard or installed module (``test.py``, ``email.py``) is now shadowed by that one:
:func:`shadow_hint` says so in the import error. This module imports only ``os`` and ``sys``,
which every interpreter has loaded before it runs any code of ours (and ``importlib.util``
when an import has failed).
"""

import os
import sys

_demoted = False


def is_cwd(entry: str) -> bool:
    """``entry`` of ``sys.path`` means the current directory."""
    if entry in ("", "."):
        return True
    try:
        return os.path.samefile(entry, os.getcwd())
    except OSError:
        return False


def demote_cwd() -> None:
    """Drop the current directory from the front of ``sys.path``, if Python's start-up put
    it there (once per process; ``-P``/``PYTHONSAFEPATH`` already leave it out)."""
    global _demoted
    if _demoted:
        return
    _demoted = True
    if sys.path and not getattr(sys.flags, "safe_path", False) and is_cwd(sys.path[0]):
        del sys.path[0]


def runs_gaspar(orig_argv: list[str]) -> bool:
    """``python [options] -m gaspar[.sub] ...``: this interpreter runs one of our modules."""
    for i, word in enumerate(orig_argv[1:], 1):
        if word == "-m":
            name = orig_argv[i + 1] if i + 1 < len(orig_argv) else ""
        elif word.startswith("-m") and not word.startswith("--"):
            name = word[2:]
        else:
            continue
        return name == "gaspar" or name.startswith("gaspar.")
    return False


def append(directory: str) -> None:
    """Search ``directory`` after everything already on ``sys.path`` (once)."""
    directory = os.path.abspath(directory)
    if directory not in sys.path:
        sys.path.append(directory)


def setup(chdir: str | None = None, pythonpath: str | None = None) -> None:
    """``--chdir DIR``, then ``--pythonpath DIR[,DIR...]`` (relative to the new directory),
    then the current directory: each appended after the standard library. Raises
    ValueError with a one-line reason."""
    demote_cwd()
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise ValueError(f"--chdir {chdir}: {exc.strerror or exc}") from None
    for directory in (pythonpath or "").split(","):
        if directory.strip():
            if not os.path.isdir(directory.strip()):
                raise ValueError(f"--pythonpath {directory.strip()}: not a directory")
            append(directory.strip())
    append(os.getcwd())


def adopt(path: list[str]) -> None:
    """A fresh fork server takes the front end's ``sys.path``, in its order; entries of
    its own that the front end lacks go after it."""
    sys.path[:] = [*path, *(p for p in sys.path if p not in path)]


#: The fresh interpreter's first statements: the current directory out (3.10 has no -P), and
#: the directory gaspar itself was imported from at the end (a clone run without installing).
BOOT = (
    "import sys\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
    "if {home!r} not in sys.path: sys.path.append({home!r})\n"
    "import runpy\n"
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
)


def fresh_interpreter(module: str, version: tuple[int, ...] = sys.version_info[:2]) -> list[str]:
    """The argv that runs ``python -m module`` without the current directory on its path
    (``-P`` on 3.11+, and a ``-c`` that also drops it, for 3.10), able to import gaspar
    from where this process did."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    safe = ["-P"] if version >= (3, 11) else []
    return [sys.executable, *safe, "-c", BOOT.format(home=home, module=module)]


def shadow_hint(module_name: str, module: object) -> str:
    """When the module imported for ``module_name`` is not the application's file of that
    name in the current directory, the words that say why; else ""."""
    top = module_name.partition(".")[0]
    here = [os.path.join(os.getcwd(), top + ".py"), os.path.join(os.getcwd(), top, "__init__.py")]
    mine = next((p for p in here if os.path.exists(p)), None)
    if mine is None:
        return ""
    if top in sys.modules:
        found = getattr(sys.modules[top], "__file__", None) or "a built-in module"
    else:  # its import failed (a syntax error, an exception in it): which one was it?
        import importlib.util  # at an error only: by now the standard library comes first

        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return ""
        if spec is None:
            return ""
        found = spec.origin if spec.origin and os.path.isabs(spec.origin) else "a built-in module"
    if found != "a built-in module" and os.path.exists(found) and os.path.samefile(found, mine):
        return ""  # the application's own module: whatever failed, it was not shadowed
    return (
        f" ({mine} is shadowed by {found}: the application's directory is searched after the standard "
        "library and installed packages; rename the module)"
    )
