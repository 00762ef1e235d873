"""One run per folder: an advisory lock on FOLDER/.lock that names its holder.

The lock is `flock` on the file, so the kernel releases it when its holder dies
(kill -9 included): a stale lock is simply a file nobody holds, taken over with
a note naming the run that left it. The file's text (pid, host, command, start)
is what a refused run reports.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class LockError(RuntimeError):
  """The folder is in use by another run, or cannot be written; the message names which."""


def _describe(holder: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return (f"{holder.get('command', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, "
          f"started {started})")


def _read(path: Path) -> dict | None:
  try:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def folder_lock(folder, command: str, hint: str):
  """Holds FOLDER/.lock for the block; raises LockError naming the holder if another run has it.

  `hint` says what the refused user can do instead (e.g. "choose another --workdir").
  """
  folder = Path(folder)
  path = folder / ".lock"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise LockError(f"{folder}: cannot write here ({e.strerror}); choose a writable folder") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(path)
      raise LockError(f"{folder}: in use by {_describe(holder) if holder else 'another run'}; "
                      f"wait for it to finish, stop it, or {hint}") from None
    except OSError as e:  # file systems without flock (some FUSE mounts)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      print(f"warning: {path}: this file system cannot lock ({e.strerror}); make sure no other run "
            "uses this folder", file=sys.stderr)
    stale = _read(path)
    if stale and stale.get("pid") != os.getpid():
      print(f"note: {folder}: taking over the lock left by {_describe(stale)}, which is no longer running",
            file=sys.stderr)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError as e:
      raise LockError(f"{folder}: cannot write here ({e.strerror}); free space or choose another folder") from e
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean exit leaves nothing to report as stale
  finally:
    os.close(fd)  # releases the flock
