"""kernels/numba/cache_guard.py: Numba's cache is dropped when any kernel source changes
(Numba itself only watches each function's own file, and the kernels compile each other in)."""
from lstmkit.kernels.numba import cache_guard


def _setup(tmp_path):
    pkg, cache = tmp_path / "pkg", tmp_path / "cache"
    pkg.mkdir()
    cache.mkdir()
    for name in ("tile.py", "lstm.py", "variants.py"):
        (pkg / name).write_text(f"# {name}\n")
    return pkg, cache


def _fill(cache):
    for name in ("lstm.forward_chunk-1.py311.nbi", "lstm.forward_chunk-1.py311.1.nbc"):
        (cache / name).write_bytes(b"compiled")


def test_cache_is_kept_while_helpers_are_unchanged_and_dropped_when_one_changes(tmp_path):
    pkg, cache = _setup(tmp_path)
    _fill(cache)
    cache_guard.drop_stale_cache(pkg, cache)  # no stamp yet: unknown provenance, dropped
    assert not list(cache.glob("*.nb*"))
    _fill(cache)
    cache_guard.drop_stale_cache(pkg, cache)
    assert len(list(cache.glob("*.nb*"))) == 2  # same helpers: kept
    (pkg / "tile.py").write_text("# tile.py, edited\n")
    cache_guard.drop_stale_cache(pkg, cache)
    assert not list(cache.glob("*.nb*"))  # a helper changed: its callers' cache is gone
    _fill(cache)
    cache_guard.drop_stale_cache(pkg, cache)
    assert len(list(cache.glob("*.nb*"))) == 2


def test_a_new_cache_directory_is_stamped_so_its_first_files_are_kept(tmp_path):
    pkg, _ = _setup(tmp_path)
    cache = tmp_path / "new" / "__pycache__"
    cache_guard.drop_stale_cache(pkg, cache)
    assert (cache / cache_guard.STAMP).is_file()
    _fill(cache)
    cache_guard.drop_stale_cache(pkg, cache)
    assert len(list(cache.glob("*.nb*"))) == 2


def test_never_raises_on_an_unreadable_package(tmp_path):
    (tmp_path / "x.nbi").write_bytes(b"compiled")
    cache_guard.drop_stale_cache(tmp_path / "missing", tmp_path / "nocache")  # no error
    assert (tmp_path / "x.nbi").exists()


def test_real_cache_location_is_found():
    from pathlib import Path

    import lstmkit.kernels.numba as kernels

    pkg = Path(kernels.__file__).parent
    assert cache_guard.numba_cache_dir(pkg) is not None
