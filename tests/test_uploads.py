"""The samapi upload store: capped per file, per folder and in all (bytes and files), idle folders expire,
parallel uploads cannot overshoot the caps, and a refused upload leaves nothing behind."""

from __future__ import annotations

import io
import threading

import pytest

from medsam2_endpoint.api.uploads import UploadStore
from medsam2_endpoint.base.errors import PayloadTooLarge


@pytest.fixture
def clock():
    now = [0.0]
    return now


def store(clock, **kw) -> UploadStore:
    defaults = dict(max_bytes=1000, max_files=10, store_bytes=2500, store_files=6, ttl_s=60.0)
    return UploadStore(**{**defaults, **kw}, clock=lambda: clock[0])


def test_the_store_is_capped_in_bytes_across_folders(clock):
    s = store(clock)
    s.save("a", "0.jpg", io.BytesIO(b"x" * 1000))
    s.save("b", "0.jpg", io.BytesIO(b"x" * 1000))
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_SAMAPI_UPLOAD_STORE_MB"):
        s.save("c", "0.jpg", io.BytesIO(b"x" * 600))
    assert not (s.root / "c" / "0.jpg").exists() and s.used_bytes == 2000  # the refused file is gone and released
    s.remove("a")
    s.save("c", "0.jpg", io.BytesIO(b"x" * 600))
    assert s.used_bytes == 1600


def test_the_store_is_capped_in_files_and_each_file_in_bytes(clock):
    s = store(clock)
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_SAMAPI_MAX_UPLOAD_MB"):
        s.save("d0", "big.jpg", io.BytesIO(b"x" * 1001))
    for k in range(6):
        s.save(f"d{k % 2}", f"{k}.jpg", io.BytesIO(b"x"))
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_SAMAPI_UPLOAD_STORE_FILES"):
        s.save("d9", "0.jpg", io.BytesIO(b"x"))
    s.save("d0", "0.jpg", io.BytesIO(b"yy"))  # replacing a file takes no new slot
    assert s.used_files == 6 and not (s.root / "d0" / "big.jpg").exists()


def test_idle_folders_expire(clock):
    s = store(clock)
    s.save("old", "0.jpg", io.BytesIO(b"x" * 10))
    clock[0] = 30.0
    s.save("recent", "0.jpg", io.BytesIO(b"x" * 10))
    clock[0] = 61.0  # "old" idle for 61 s, "recent" for 31 s
    s.save("new", "0.jpg", io.BytesIO(b"x" * 10))
    assert not (s.root / "old").exists() and (s.root / "recent" / "0.jpg").exists()
    assert s.used_files == 2


def test_parallel_uploads_never_overshoot_the_store(clock):
    s = store(clock, store_bytes=5000, store_files=1000, max_files=1000)
    refused: list[str] = []

    def upload(k: int) -> None:
        try:
            s.save("p", f"{k}.jpg", io.BytesIO(b"x" * 900))
        except PayloadTooLarge:
            refused.append(str(k))

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    on_disk = sum(p.stat().st_size for p in (s.root / "p").iterdir())
    assert on_disk == s.used_bytes <= 5000 and len(refused) == 20 - on_disk // 900
