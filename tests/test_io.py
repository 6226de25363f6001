"""Atomic writes: a result folder is complete or absent, never half-written, and a re-save replaces it as a whole."""

from __future__ import annotations

import os

import pytest

from nlsr_hub import io as nlsr_io
from nlsr_hub.io import atomic_directory, atomic_write_text, check_output_folder

OWNED = ("a.json", "b.json", "marker.json")


def test_new_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"), atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "{}")
        raise RuntimeError("crash mid-save")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder or lock left behind
    with atomic_directory(target) as staging:
        atomic_write_text(staging / "a.json", "{}")
        atomic_write_text(staging / "b.json", "[]")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_result_is_untouched_by_a_failed_save_and_replaced_whole_by_a_good_one(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, owned=OWNED, marker="marker.json") as staging:
        for name in OWNED:
            atomic_write_text(staging / name, "old")
    with pytest.raises(RuntimeError), atomic_directory(target, owned=OWNED, marker="marker.json") as staging:
        atomic_write_text(staging / "a.json", "new")
        raise RuntimeError("crash")
    assert {p.name: p.read_text() for p in target.iterdir()} == dict.fromkeys(OWNED, "old")
    with atomic_directory(target, owned=OWNED, marker="marker.json") as staging:
        atomic_write_text(staging / "a.json", "new")
        atomic_write_text(staging / "marker.json", "new")
    # replaced as a whole: the old b.json is gone, not mixed into the new result
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.json": "new", "marker.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resave_without_atomic_exchange_still_replaces_whole(tmp_path, monkeypatch):
    """Where the system has no atomic exchange, the fallback (two renames) gives the same result."""
    monkeypatch.setattr(nlsr_io, "_exchange", lambda first, second: False)
    target = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_directory(target, owned=OWNED, marker="marker.json") as staging:
            atomic_write_text(staging / "marker.json", text)
            if text == "old":
                atomic_write_text(staging / "b.json", text)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"marker.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("files", [["user-notes.txt"], ["README.md"], ["a.json", "notes.txt"]],
                         ids=["foreign-file", "only-a-readme", "result-plus-foreign"])
def test_a_folder_with_files_nlsr_did_not_write_is_refused_and_kept(tmp_path, files):
    target = tmp_path / "out"
    target.mkdir()
    for name in files:
        (target / name).write_text("mine")
    with pytest.raises(ValueError, match=r"new or empty folder") as info, \
            atomic_directory(target, owned=("a.json", "README.md", "marker.json"), marker="marker.json"):
        pytest.fail("the body must not run")
    assert "\n" not in str(info.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == dict.fromkeys(files, "mine")


def test_an_empty_existing_folder_is_accepted(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_directory(target, owned=OWNED, marker="marker.json") as staging:
        atomic_write_text(staging / "marker.json", "x")
    assert [p.name for p in target.iterdir()] == ["marker.json"]


def test_target_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(ValueError, match=r"is a file"), atomic_directory(target):
        pytest.fail("the body must not run")
    assert target.read_text() == "a file"


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, owned=OWNED) as staging:
        atomic_write_text(staging / "a.json", "first")
        with pytest.raises(ValueError, match=r"Another process is writing"), atomic_directory(target, owned=OWNED):
            pytest.fail("the body must not run")
    assert (target / "a.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_folders_left_by_a_killed_save_are_removed_by_the_next(tmp_path):
    target = tmp_path / "out"
    stale = [tmp_path / ".out.nlsr-0123abcd.partial", tmp_path / ".out.nlsr-89abcdef.old"]
    for folder in stale:
        folder.mkdir()
        (folder / "a.json").write_text("half")
    other = tmp_path / ".out2.nlsr-0123abcd.partial"  # another folder's: not touched
    other.mkdir()
    with atomic_directory(target, owned=OWNED) as staging:
        atomic_write_text(staging / "a.json", "whole")
    assert not any(folder.exists() for folder in stale)
    assert other.exists()


def test_unwritable_parent_is_reported_before_any_work(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(nlsr_io.os, "access", lambda path, mode: False if str(path) == str(tmp_path)
                        else real_access(path, mode))
    with pytest.raises(ValueError, match=r"no write permission"):
        check_output_folder(tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "out")


def test_a_symlinked_result_is_replaced_by_a_folder_and_its_target_kept(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    with atomic_directory(elsewhere, owned=OWNED, marker="marker.json") as staging:
        atomic_write_text(staging / "marker.json", "old")
    (tmp_path / "out").symlink_to(elsewhere, target_is_directory=True)
    with atomic_directory(tmp_path / "out", owned=OWNED, marker="marker.json") as staging:
        atomic_write_text(staging / "marker.json", "new")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "marker.json").read_text() == "new"
    assert (elsewhere / "marker.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_the_current_folder_is_never_swapped_away(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ValueError, match=r"current folder"), atomic_directory(target):
            pytest.fail("the body must not run")
    assert os.getcwd() == str(tmp_path)


def test_a_result_folder_is_synced_as_a_whole_before_the_swap_and_a_lone_file_at_once(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    sync, swap = nlsr_io._fsync, nlsr_io._swap_in
    monkeypatch.setattr(nlsr_io, "_fsync", lambda path: (events.append(("sync", os.path.basename(path))), sync(path)))
    monkeypatch.setattr(nlsr_io, "_swap_in", lambda staging, final: (events.append(("swap", final.name)),
                                                                     swap(staging, final)))
    with atomic_directory(tmp_path / "out") as staging:
        atomic_write_text(staging / "a.json", "{}")
        assert events == []  # written into the staging folder: not synced on its own
        (staging / "sub").mkdir()
        (staging / "sub" / "lib.bin").write_bytes(b"written by a library")  # not through this module
    synced = [name for kind, name in events[:-2] if kind == "sync"]
    assert sorted(synced[:2]) == ["a.json", "lib.bin"]  # every file, then the folders
    assert synced[2:] == ["sub", staging.name] and events[-2:] == [("swap", "out"), ("sync", tmp_path.name)]
    events.clear()
    atomic_write_text(tmp_path / "lone.json", "{}")
    assert [kind for kind, _ in events] == ["sync"] and events[0][1].startswith(".lone.json.")  # before the rename
