"""Files under PONDER_FILES_DIR that no row names, swept by beat's hourly purge: an upload's `.part`
left by an API process that died mid-upload, and bytes whose row never committed (the upload's
commit failed after its file was moved under its id; a batch finalization that died before its
commit). Bytes go before their row is written (a row never lacks them), so a file is only taken
for stray once nothing has touched it for STRAY_AFTER_SECONDS: any writer still at work (an upload
arrives at PONDER_API_BODY_MIN_RATE at least, a finalization writes as it goes) is far younger."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sqlmodel import Session, col, select

from ponder.service.db import sql_engine
from ponder.service.settings import Settings
from ponder.service.tables import StoredFile

STRAY_AFTER_SECONDS = 3600
CHUNK = 500  # names looked up per query


def sweep_stray_files(settings: Settings, now: float | None = None) -> dict[str, int]:
    """Delete the `.part` files and the row-less files untouched for STRAY_AFTER_SECONDS."""
    directory = settings.files_dir
    if not directory.is_dir():
        return {"stray_files_deleted": 0}
    before = (time.time() if now is None else now) - STRAY_AFTER_SECONDS
    old = [path for path in directory.iterdir() if path.is_file() and _modified(path) < before]
    partial = [path for path in old if path.name.startswith(".") and path.name.endswith(".part")]
    named = [path for path in old if path not in partial]
    stray = partial + _without_rows(named, settings)
    for path in stray:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return {"stray_files_deleted": len(stray)}


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # deleted meanwhile
        return float("inf")


def _without_rows(paths: list[Path], settings: Settings) -> list[Path]:
    without = []
    with Session(sql_engine(settings, background=True)) as session:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start : start + CHUNK]
            names = [path.name for path in chunk]
            kept = set(session.exec(select(StoredFile.id).where(col(StoredFile.id).in_(names))).all())
            without += [path for path in chunk if path.name not in kept]
    return without
