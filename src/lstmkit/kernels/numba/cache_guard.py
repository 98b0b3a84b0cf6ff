"""Keep Numba's on-disk cache from serving kernels built from older helper code.

Numba keys each cached function by the timestamp of its own source file only, but the kernels
here compile each other in (tile.py, simd.py, rows.py and activations.py into lstm.py and variants.py;
lstm.py into variants.py and step.py): after an edit or a `git pull` that changes one file but
not its callers, the callers' cache would keep the old code and compute with it, silently. So a
hash of all the package's sources is kept beside the cache; when it differs, the package's cache
files are deleted before anything loads them (one full recompile after any change).
"""
import hashlib
import os
from pathlib import Path

STAMP = "lstmkit-kernel-sources.sha256"


def sources_hash(package_dir: Path) -> str:
    """sha256 over the package's .py files, names and contents."""
    h = hashlib.sha256()
    for path in sorted(package_dir.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
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
    """Delete this package's Numba cache files when its sources changed since they were written
    (package_dir / cache: this package and Numba's cache for it unless given, for tests).
    Never raises: a cache that cannot be checked is left to Numba."""
    try:
        package_dir = package_dir or Path(__file__).resolve().parent
        cache = cache or numba_cache_dir(package_dir)
        if cache is None:
            return
        stamp = cache / STAMP
        current = sources_hash(package_dir)
        if not cache.is_dir():  # nothing cached yet: stamp the empty cache, so what Numba writes next is ours
            cache.mkdir(parents=True, exist_ok=True)
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
