"""Atomic writes: a result folder is complete or absent, never half-written."""

from __future__ import annotations

import pytest

from nlsr_hub.io import atomic_directory, atomic_write_text


def test_new_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"), atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "{}")
        raise RuntimeError("crash mid-save")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind
    with atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "{}")
        atomic_write_text(staging / "b.json", "[]")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_folder_is_untouched_by_a_failed_save_and_updated_by_a_good_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    atomic_write_text(target / "a.json", "old")
    atomic_write_text(target / "user-notes.txt", "mine")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "new")
        raise RuntimeError("crash")
    assert (target / "a.json").read_text() == "old"
    with atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "new")
    assert (target / "a.json").read_text() == "new"
    assert (target / "user-notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
