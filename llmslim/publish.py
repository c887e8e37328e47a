"""Publishing an output folder so that a crash at any moment loses nothing.

An output ``OUT`` is assembled in ``.OUT.staging-<pid>/`` beside it; its
report.json, written last and fsynced, lists every other file with its size
(``files``), so a folder is *complete* exactly when its report verifies. The
swap is two renames: ``OUT`` -> ``.OUT.old-<pid>``, staging -> ``OUT``.

Every run first :func:`recover`-s what an earlier, killed run left:

* a complete staging folder is the newest finished result: it is put in place
  (the previous output moved aside, then removed);
* otherwise, when ``OUT`` is missing but a previous output was moved aside, it
  is restored;
* everything else (incomplete staging, old copies) is removed.

So at any moment ``OUT`` is either absent or a complete output, and a
leftover that looks finished is either published or deleted by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmslim.errors import DiskSpaceError
from llmslim.progress import LOGGER

__all__ = ["guard_output", "previous_report", "list_files", "output_problem", "recover", "publish", "staging_path", "foreign_files",
           "FAILED_REPORT", "fsync_dir", "read_report_json", "is_llmslim_output", "no_space_message", "check_free_space",
           "user_umask", "apply_umask"]

FAILED_REPORT = ".last-failed-report.json"
_OWN = {"report.json", FAILED_REPORT}
_STAGING, _OLD, _LEGACY = ".staging-", ".old-", ".tmp-"


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}{_STAGING}{os.getpid()}"


def _old_path(output: Path) -> Path:
    return output.parent / f".{output.name}{_OLD}{os.getpid()}"


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the reports."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in _OWN}


def read_report_json(folder: Path) -> dict | None:
    path = Path(folder) / "report.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "status" in data and "fingerprint" in data else None


def is_llmslim_output(folder: Path) -> bool:
    """An output llmslim wrote: it holds llmslim's report.json."""
    return Path(folder).is_dir() and read_report_json(folder) is not None


def output_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete output (None when it is)."""
    report = read_report_json(folder)
    if report is None:
        return "no readable report.json"
    listed = report.get("files")
    if not isinstance(listed, dict):
        return "its report lists no files (written by an older llmslim)"
    for name, size in listed.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the report says {size}"
    return None


def foreign_files(folder: Path) -> list[str]:
    """Files in an llmslim output that its report does not list (the user's own)."""
    report = read_report_json(folder) or {}
    listed = report.get("files")
    if not isinstance(listed, dict):
        return []
    return sorted(set(list_files(folder)) - set(listed))


def user_umask() -> int:
    """The process's umask (from /proc/self/status where there is one, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and restore it at once)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and everything under a folder) the modes a plain create would: files 0666 & ~umask
    (0777 when executable), folders 0777 & ~umask. Staging and work files may be private (safetensors
    writes 0600); published ones must be readable as the user's umask says. Links are left alone."""
    mask = user_umask()
    paths = [Path(path)] + (sorted(Path(path).rglob("*")) if Path(path).is_dir() else [])
    for item in paths:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o111
        try:
            os.chmod(item, (0o777 if executable else 0o666) & ~mask)
        except PermissionError as exc:  # a filesystem without modes: the files stay as they were written
            LOGGER.warning("cannot set the mode of %s (%s); published files keep their modes", item, exc)
            return


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftovers(output: Path, marker: str) -> list[Path]:
    prefix = f".{output.name}{marker}"
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.iterdir()
                  if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover(output: Path) -> None:
    """Finish or roll back what a killed run left beside ``output`` (call under the output lock)."""
    staged = _leftovers(output, _STAGING) + _leftovers(output, _LEGACY)
    old = _leftovers(output, _OLD)
    complete = [p for p in staged if output_problem(p) is None]
    if complete:
        newest = max(complete, key=lambda p: (Path(p) / "report.json").stat().st_mtime_ns)
        LOGGER.warning("%s: an interrupted run had finished %s; publishing it", output.name, newest.name)
        publish(newest, output)
        staged.remove(newest)
    elif not output.exists() and old:
        LOGGER.warning("%s: an interrupted run had moved the previous output aside; restoring it", output.name)
        os.replace(old[-1], output)
        old = old[:-1]
    for path in staged + old:
        if path.exists():
            LOGGER.info("%s: removing %s left by an interrupted run", output.name, path.name)
            _remove(path)


def publish(staged: Path, output: Path) -> None:
    """Replace ``output`` by the complete ``staged`` folder with two renames (modes as the umask says)."""
    apply_umask(staged)
    fsync_dir(staged)
    old = None
    if output.exists():
        old = _old_path(output)
        _remove(old)
        os.replace(output, old)
    try:
        os.replace(staged, output)
    except OSError:
        if old is not None:
            os.replace(old, output)
        raise
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def no_space_message(exc: OSError, where: Path, needed: int | None = None) -> str | None:
    """A readable message for a full disk, or None for other errors."""
    if exc.errno != errno.ENOSPC:
        return None
    free = shutil.disk_usage(where).free if where.exists() else 0
    need = f" about {needed / 1e6:,.0f} MB are needed;" if needed else ""
    return (f"no space left on the device of {where} ({free / 1e6:,.0f} MB free;{need} completed steps are kept): "
            "free space there, or choose an output on another disk, and rerun to resume")


def check_free_space(where: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes into ``where`` when the disk cannot hold them."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(f"not enough free space in {probe}: writing needs about {needed / 1e6:,.0f} MB, "
                          f"{free / 1e6:,.0f} MB are free; free space there or choose an output on another disk")


def previous_report(output: Path):
    """The Report in ``output`` when it is a readable llmslim output, else None."""
    from llmslim.report import read_report

    if not is_llmslim_output(output):
        return None
    try:
        return read_report(output)
    except (OSError, ValueError):
        return None


def guard_output(output: Path, prev, name: str, force: bool) -> None:
    """Replace only llmslim's own outputs: silently when it is this recipe's (``prev``: its Report),
    otherwise with --force."""
    from llmslim.errors import OutputError

    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not is_llmslim_output(output):
        raise OutputError(f"output folder {output} exists and was not written by llmslim (no report.json); "
                          "llmslim never deletes it, even with --force: move it away or choose another output")
    foreign = foreign_files(output)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputError(f"output folder {output} holds files llmslim did not write ({shown}); "
                          "move them out of it first, llmslim never deletes them")
    if prev is not None and prev.name != name and not force:
        raise OutputError(f"output folder {output} holds the output of recipe {prev.name!r}, not {name!r}; "
                          "choose another output or pass --force")


@contextmanager
def writing_step(final: Path, tmp: Path, index: int, needed: int) -> Iterator[Path]:
    """Write step ``index``'s checkpoint into ``tmp`` (stale ``tmp``/``final`` removed, ``needed`` bytes of
    free space checked first). On failure ``tmp`` is removed, and a full disk is a :class:`DiskSpaceError`."""
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    check_free_space(tmp.parent, needed)
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        message = no_space_message(exc, tmp.parent, needed)
        if message:
            raise DiskSpaceError(f"saving step {index + 1}: {message}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
