"""The temporary files of teacher cache builds: created locked under an owner's name, and removed once stale.

A cache file is written under a temporary name, `<file>.<host>-<pid>.<random>.tmp`, and renamed when complete, so an
interrupted build never leaves a file that looks valid. An exception or Ctrl-C removes the temporary file at once; a
killed process (SIGKILL, out of memory, power loss) cannot, so every build first removes the temporary files in its
folder left by processes of this host that no longer run and hold no lock on them.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile

from transformers.utils import logging

try:  # POSIX only; elsewhere stale temporary files are never removed (see `remove_stale_temp_files`)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.get_logger(__name__)

# `<file>.<host tag>-<pid>.<mkstemp's random part>.tmp`; the random part is letters, digits and underscores.
_TEMP_NAME = re.compile(r"^(?P<final>.+\.safetensors)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$")
# What version 1 wrote (`<file>.<random>.tmp`, no owner in the name): reported, never removed.
_LEGACY_TEMP_NAME = re.compile(r"^.+\.safetensors\.[a-z0-9_]{8}\.tmp$")


def host_tag() -> str:
    """8 hex digits naming this machine in temporary file names: a PID means nothing on another host of a shared disk."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a zombie counts: its parent has not collected it yet)."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def create_temp_file(path: str) -> tuple[int, str]:
    """Create and exclusively lock the temporary file of a build of `path`; returns its descriptor and path.

    The name holds this host and process, so a later build can tell that the process is gone; the `flock`, held until
    the descriptor is closed, guards a live build whose PID the cleaner cannot see (another PID namespace). On NFS,
    where Linux emulates `flock` with POSIX locks that any `close` of the file by the process releases (the memory
    maps open and close it), only the host and PID check protects a live build.
    """
    handle, temp_path = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=f"{os.path.basename(path)}.{host_tag()}-{os.getpid()}.", suffix=".tmp"
    )
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle, temp_path


def remove_stale_temp_files(cache_dir: str) -> None:
    """Remove the temporary files in `cache_dir` of builds that were killed (their process is gone), and only those.

    A file is removed only when it names this host, its process no longer runs, and no one holds its lock, so a
    concurrent build of another process (of any cache, on any host) keeps its file.
    """
    if fcntl is None:
        return
    legacy = []
    for entry in os.scandir(cache_dir):
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            if _LEGACY_TEMP_NAME.match(entry.name):
                legacy.append(entry.name)
            continue
        if match["host"] != host_tag() or _process_alive(int(match["pid"])):
            continue
        try:
            handle = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile by another process's cleanup
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = os.fstat(handle).st_size
            os.remove(entry.path)
        except (BlockingIOError, FileNotFoundError):  # held by a live build, or removed meanwhile
            continue
        finally:
            os.close(handle)
        logger.warning(
            f"Removed {entry.path} ({size} bytes), the temporary file of a teacher cache build by process "
            f"{match['pid']} of this host, which was killed before it finished."
        )
    if legacy:
        logger.warning(
            f"{cache_dir} holds temporary files of teacher cache builds by an earlier hf-compress version "
            f"({', '.join(sorted(legacy))}); they are not used and cannot be told apart from a build still running, "
            "so they are kept: delete them once no older hf-compress is building a cache there."
        )
