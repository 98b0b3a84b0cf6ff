"""Keep Numba's on-disk cache from serving kernels built from older helper code.

Numba keys each cached function by the timestamp of its own source file only. tile.py, simd.py
and activations.py are compiled *into* their callers (lstm.py, variants.py, step.py): after an
edit or a `git pull` that changes one of them but not the caller, the caller's cache would keep
the old code and compute with it, silently. So a hash of the helpers' sources is kept beside the
cache; when it differs, this package's cache files are deleted before anything loads them.
"""
import hashlib
import os
from pathlib import Path

HELPERS = ("tile.py", "simd.py", "activations.py")
STAMP = "lstmkit-kernel-helpers.sha256"


def _helpers_hash(package_dir: Path) -> str:
    h = hashlib.sha256()
    for name in HELPERS:
        h.update((package_dir / name).read_bytes())
    return h.hexdigest()


def numba_cache_dir(package_dir: Path):
    """Where Numba caches this package's functions: its own locator choice, asked for lstm.py."""
    from numba.core.caching import CacheImpl

    def probe():  # any function: the locators read its first line number only
        return None

    for locator_class in CacheImpl._locator_classes:
        locator = locator_class.from_function(probe, str(package_dir / "lstm.py"))
        if locator is not None:
            return Path(locator.get_cache_path())
    return None


def drop_stale_cache(package_dir: Path | None = None, cache: Path | None = None) -> None:
    """Delete this package's Numba cache files when the helpers changed since they were written
    (package_dir / cache: this package and Numba's cache for it unless given, for tests).
    Never raises: a cache that cannot be checked is left to Numba."""
    try:
        package_dir = package_dir or Path(__file__).resolve().parent
        cache = cache or numba_cache_dir(package_dir)
        if cache is None or not cache.is_dir():
            return
        stamp = cache / STAMP
        current = _helpers_hash(package_dir)
        if stamp.is_file() and stamp.read_text().strip() == current:
            return
        for pattern in ("*.nbi", "*.nbc"):
            for f in cache.glob(pattern):
                f.unlink(missing_ok=True)
        tmp = cache / f"{STAMP}.{os.getpid()}"
        tmp.write_text(current)
        tmp.replace(stamp)
    except Exception:  # noqa: BLE001 - a read-only or odd cache location: Numba decides
        return
