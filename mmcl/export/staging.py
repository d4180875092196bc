"""The one place `--out` / `--overwrite` are decided for `mmcl export` and `mmcl convert`, and the atomic replace.

    out = check_out(args.out, overwrite=args.overwrite, sources=[...], run_dir=...)   # before any work
    with staged(out) as folder:                                                       # write everything in `folder`
        ...

`check_out` refuses, in one sentence and before any work: a symbolic link as `--out`, `/`, the
home folder or a folder above it, the current folder or a folder above it, the source (run,
checkpoint, weights) or a folder above or inside it, an existing file, a place that cannot be
created or written, and a non-empty folder that is not an earlier mmcl output (one holding a
file of `OUTPUT_MARKERS`); without `--overwrite` it also refuses any non-empty folder.

`staged` writes the new output in a work folder beside `out` (`.<name>.mmcl-replace-<id>/new`),
then moves the old output aside into that work folder, moves the new one in, and deletes the
work folder. A kill at any moment leaves `out` whole (old or new), except between the two
renames, when both lie whole inside the work folder; the next `check_out` of the same `out`
puts the right one back (the new one once it was complete, else the old one) and deletes the
work folder. A work folder is recognised by its name and the `mmcl-replace.json` inside it;
nothing else is ever deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from mmcl.export.errors import ExportError

# The file each kind of mmcl output holds (transformers export, OpenCLIP export, OpenCLIP conversion, WiSE-FT):
# an existing non-empty folder is replaced only when it holds one of them.
OUTPUT_MARKERS = ("mmcl_export.json", "mmcl_openclip_export.json", "openclip_conversion.json", "mmcl_wise_ft.json")
WORK_INFIX = ".mmcl-replace-"
WORK_MARKER = "mmcl-replace.json"
COMPLETE = "complete"  # created in the work folder once `new` holds the whole, checked output
_KILL_AT = "MMCL_TEST_KILL_AT"  # tests: SIGKILL this process at a named step of the replace


def is_mmcl_output(folder: Path) -> bool:
    """True when `folder` holds a marker file that only mmcl's export and convert write."""
    return any((folder / name).is_file() and not (folder / name).is_symlink() for name in OUTPUT_MARKERS)


def check_out(out_dir: str | Path, *, overwrite: bool, sources: Iterable[str | Path] = (),
              run_dir: str | Path | None = None, what: str = "export folder") -> Path:
    """The absolute `out_dir`, once it may be written (and, with overwrite, replaced); ExportError otherwise.

    sources: paths the output is made from (checkpoint, model folder, weights file): `out_dir` may be
    neither one of them, nor a folder above one, nor a folder inside one. run_dir: the run the
    source belongs to: `out_dir` may be inside it (`runs/x/export`) but not the run itself or above it.
    Also finishes or removes what a killed earlier replace of the same `out_dir` left (see the module docstring).
    """
    raw = Path(os.path.expanduser(str(out_dir)))
    if raw.is_symlink():
        raise ExportError(f"--out {out_dir} is a symbolic link (to {os.readlink(raw)}); mmcl neither writes through nor "
                          "replaces links, so pass a real folder path.")
    out = Path(os.path.abspath(raw)).resolve()  # abspath first: "a/.." is a folder above, not a link to follow
    _refuse_protected(out, [Path(p) for p in sources], Path(run_dir) if run_dir is not None else None)
    parent = _writable_parent(out)
    if parent == out.parent:
        try:
            recover(out)
        except OSError as error:
            raise ExportError(f"what an earlier, stopped mmcl run left beside {out} could not be cleaned up "
                              f"({error.strerror or error}); remove the .{out.name}{WORK_INFIX}* folders yourself.") from error
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} is an existing file; choose a folder path for the output.")
    if out.is_dir() and any(out.iterdir()):
        mine = is_mmcl_output(out)
        if not overwrite:
            hint = "or pass --overwrite" if mine else "(--overwrite only replaces an earlier mmcl export or conversion)"
            raise ExportError(f"{what} {out} already exists and is not empty; choose a new --out {hint}.")
        if not mine:
            raise ExportError(f"--out {out} is a non-empty folder that mmcl did not write (it holds none of "
                              f"{', '.join(OUTPUT_MARKERS)}); --overwrite only replaces an earlier mmcl export or "
                              "conversion, so choose a new folder.")
    if out.is_dir() and os.path.ismount(out):
        raise ExportError(f"--out {out} is a mount point, which cannot be replaced; choose a folder inside it.")
    return out


def _refuse_protected(out: Path, sources: list[Path], run_dir: Path | None) -> None:
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if out == Path(out.anchor):
        raise ExportError(f"--out {out} is the root folder; choose a new folder for the output.")
    for place, name in ((home, "your home folder"), (cwd, "the current folder")):
        if out == place or out in place.parents:
            where = name if out == place else f"a folder above {name} ({place})"
            raise ExportError(f"--out {out} is {where}; choose a new folder for the output.")
    if run_dir is not None:
        run_dir = Path(os.path.abspath(run_dir.expanduser())).resolve()
        if out == run_dir or out in run_dir.parents:
            where = "the run folder" if out == run_dir else "a folder above the run folder"
            raise ExportError(f"--out {out} is {where} {run_dir}; choose a folder outside it, or a new one inside it.")
    for source in sources:
        source = Path(os.path.abspath(Path(source).expanduser())).resolve()
        if out == source or out in source.parents:
            where = "the source" if out == source else "a folder above the source"
            raise ExportError(f"--out {out} is {where} {source}; choose a folder outside it.")
        if source in out.parents:
            raise ExportError(f"--out {out} is inside the source {source}; choose a folder outside it.")


def _writable_parent(out: Path) -> Path:
    """The nearest existing folder above `out`, which must be a writable folder."""
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out} cannot be created: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out} cannot be created: {parent} is not writable; choose a folder you can write to.")
    return parent


def check_export_out(run_or_checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool,
                     trust_checkpoint: bool = False):
    """(checked out folder, Source) for `mmcl export --run RUN --out DIR`: DIR may not be the run or above it,
    nor the weights, the run's checkpoints/ or model/ folder, or a place above or inside them. The
    checkpoint is checked too (`source.locate`: intact, and nothing but tensors unless `trust_checkpoint`)."""
    from mmcl.export.source import CHECKPOINTS, MODEL_DIR, locate

    source = locate(run_or_checkpoint, trust_checkpoint)
    given = Path(os.path.expanduser(str(run_or_checkpoint)))
    sources = [source.weights]
    if source.checkpoint is not None:
        sources.append(source.checkpoint.parent)
    if source.run_dir is not None:
        sources += [source.run_dir / CHECKPOINTS, source.run_dir / MODEL_DIR]
    if source.run_dir is None or given.resolve() != source.run_dir.resolve():
        sources.append(given)
    return check_out(out_dir, overwrite=overwrite, sources=sources, run_dir=source.run_dir), source


def check_convert_out(model: str, out_dir: str | Path, *, overwrite: bool, weights: str | None = None,
                      config_file: str | None = None) -> Path:
    """The checked out folder of `mmcl convert openclip`: not the weights, the config or a local-dir: model
    folder, nor a folder above or inside them."""
    sources = [path for path in (weights, config_file) if path]
    for flag, path in (("--weights", weights), ("--config", config_file)):
        given = Path(path).expanduser() if path else None
        if given is not None and not given.is_file():  # /dev/null exists, but is no file either
            state = "is a folder" if given.is_dir() else "is not a regular file" if given.exists() else "does not exist"
            raise ExportError(f"{flag} {path} {state}; pass the file itself.")
    if model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        if not Path(folder).expanduser().is_dir():
            raise ExportError(f"--model {model} names no folder; pass local-dir: with an OpenCLIP folder "
                              "(open_clip_config.json and its weights).")
        sources.append(folder)
    return check_out(out_dir, overwrite=overwrite, sources=sources, what="output folder")


# ----------------------------------------------------------------------------- the replace


def _kill_point(step: str) -> None:
    if os.environ.get(_KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside `out`; when the block succeeds it replaces `out` atomically (see the
    module docstring), when it fails it is removed and `out` is left as it was. Check `out` with check_out first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}{WORK_INFIX}{uuid.uuid4().hex[:12]}"
    work.mkdir()
    (work / WORK_MARKER).write_text(json.dumps({"out": out.name, "host": socket.gethostname(), "pid": os.getpid()}))
    (work / "new").mkdir()
    try:
        yield work / "new"
        _kill_point("written")
        (work / COMPLETE).touch()
        _kill_point("complete")
        _swap(work, out)
    except BaseException:
        _discard(work)
        raise
    _kill_point("swapped")
    _discard(work)


def _swap(work: Path, out: Path) -> None:
    """out -> work/old, work/new -> out; puts the old one back if the second rename fails."""
    old = work / "old"
    if out.is_symlink() or out.exists():
        if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not is_mmcl_output(out)):
            raise ExportError(f"{out} changed while mmcl was writing and is no longer an mmcl output; the new output "
                              "was not moved in, and nothing was deleted.")
        os.rename(out, old)
        _kill_point("aside")
    try:
        os.rename(work / "new", out)
    except OSError as error:
        if old.is_dir():
            os.rename(old, out)
        raise ExportError(f"the new output could not be moved to {out} ({error.strerror or error}); the old one is "
                          "left in place.") from error


def _discard(work: Path) -> None:
    """Delete a work folder, known entries only and the marker last, so a kill leaves it recognisable."""
    for name in ("old", "new"):
        if (work / name).is_dir() and not (work / name).is_symlink():
            shutil.rmtree(work / name)
            _kill_point(f"deleted {name}")
    for name in (COMPLETE, WORK_MARKER):
        (work / name).unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:  # something mmcl did not put there: leave it
        pass


def _work_folders(out: Path) -> list[Path]:
    prefix = f".{out.name}{WORK_INFIX}"
    return sorted(path for path in out.parent.iterdir()
                  if path.name.startswith(prefix) and path.is_dir() and not path.is_symlink())


def _alive_here(marker: Path) -> bool:
    """True when the marker names a process of this machine that still runs (a concurrent replace)."""
    try:
        owner = json.loads(marker.read_text())
        if owner.get("host") != socket.gethostname() or int(owner["pid"]) == os.getpid():
            return False
        os.kill(int(owner["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recover(out: Path) -> list[str]:
    """Finish what killed replaces of `out` left beside it; returns one line per work folder handled.

    If `out` is missing, the complete new output (else the old one) is moved back to `out`; the
    rest of the work folder is deleted. An empty work folder (killed before its marker) is removed;
    one without its marker that is not empty is not mmcl's and stays.
    """
    done = []
    for work in _work_folders(out):
        marker = work / WORK_MARKER
        if not (marker.is_file() and not marker.is_symlink()):
            if not any(work.iterdir()):
                work.rmdir()
                done.append(f"removed the empty {work.name}")
            continue
        if _alive_here(marker):
            raise ExportError(f"another mmcl process is writing {out} (see {work}); wait for it to finish, or choose "
                              "another --out.")
        if not out.exists() and not out.is_symlink():
            for name in ((("new",) if (work / COMPLETE).is_file() else ()) + ("old",)):
                if (work / name).is_dir() and not (work / name).is_symlink():
                    os.rename(work / name, out)
                    done.append(f"restored the {'new' if name == 'new' else 'previous'} output from {work.name}")
                    break
        _discard(work)
        done.append(f"removed {work.name}")
    return done
