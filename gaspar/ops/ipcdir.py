"""The front end's private directory for its ipc sockets, and the clean-up of stale ones.

Each front end makes ``$TMPDIR/gaspar-XXXXXXXX`` (mode 0700, ``tempfile.mkdtemp``) for the
0MQ socket its workers connect to, and removes it when it stops. A front end killed with
SIGKILL cannot: its directory stays behind. So each directory holds ``owner.pid``, the
front end's pid and the start time the kernel gives that process (``/proc/PID/stat``,
field 22), and every front end, on start, removes the ``gaspar-*`` directories of this
user whose owner is gone.

A directory is removed only when all of these hold: it is a real directory (not a
symlink) owned by this user, it has an ``owner.pid`` in this format, and no process with
that pid *and* that start time exists (a pid reused by another process does not keep a
directory alive). Anything else, including a directory that has no ``owner.pid`` yet (a
front end between ``mkdtemp`` and writing it) or one made by something else
(``gaspar ctl``'s ``gaspar-UID``), is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile

log = logging.getLogger("gaspar")

PREFIX = "gaspar-"
OWNER_FILE = "owner.pid"


def start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), None if there is
    no such process. Where /proc is missing, "" for a process that exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":  # dead, not yet reaped by its parent
            return None
        return fields[19].decode()  # field 22 of the whole line; fields[0] is field 3
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        return None
    try:  # no /proc: existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def make_ipc_dir() -> str:
    """Remove stale directories, then make this front end's (0700), with its ``owner.pid``."""
    remove_stale()
    path = tempfile.mkdtemp(prefix=PREFIX)
    pid = os.getpid()
    tmp = os.path.join(path, OWNER_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{pid} {start_time(pid) or ''}\n")
    os.replace(tmp, os.path.join(path, OWNER_FILE))  # never seen half written
    return path


def is_stale(path: str) -> bool:
    """True when ``path`` is this user's gaspar directory and its owner is gone."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        owner = os.path.join(path, OWNER_FILE)
        ost = os.lstat(owner)
        if not stat.S_ISREG(ost.st_mode) or ost.st_uid != os.getuid():
            return False
        with open(owner) as f:
            words = f.read(100).split()
    except OSError:
        return False
    if not words or not words[0].isdigit() or len(words) > 2:
        return False
    recorded = words[1] if len(words) == 2 else ""
    now = start_time(int(words[0]))
    return now is None or (bool(recorded) and bool(now) and now != recorded)


def remove_stale(tmpdir: str | None = None) -> list[str]:
    """Remove this user's ``gaspar-*`` directories whose front end is gone; return them."""
    tmpdir = tmpdir or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(tmpdir) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(tmpdir, name)
        if is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
                log.info("Removed %s, left by a front end that was killed", path)
    return removed
