"""Output directories: lowbit replaces only what it wrote itself (``.lowbit-output.json`` marker), refuses
foreign files always, another kind of output unless ``overwrite``, and the working / home / root
directories outright; the CLI checks ``--out`` before loading anything."""

import errno
import json
import os

import jax.numpy as jnp
import pytest

from lowbit.io import checkpoint, outputs
from lowbit.io.outputs import MARKER, prepare_output_dir, prepare_output_file

MISSING_MODEL = "/nonexistent/lowbit-model"  # the --out checks must fail before this is looked at


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d).replace(os.sep, "/")
                  for r, _, fs in os.walk(d) for f in fs)


def _foreign(tmp_path, *names):
    d = tmp_path / "out"
    d.mkdir()
    for n in names:
        (d / n).write_text("mine")
    return d


# ----------------------------------------------------------------------------- prepare_output_dir


def test_missing_or_empty_directory_is_accepted(tmp_path):
    p = tmp_path / "a" / "b" / "out"
    assert prepare_output_dir(str(p), "checkpoint") == str(p)
    assert p.parent.is_dir() and not p.exists() and os.listdir(p.parent) == []  # parents made, probe gone
    p.mkdir()
    assert prepare_output_dir(str(p), "checkpoint") == str(p)


def test_foreign_files_are_refused_even_with_overwrite(tmp_path):
    d = _foreign(tmp_path, "notes.txt", "a.txt", "b.txt", "c.txt")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds files lowbit did not write \(a.txt, b.txt, c.txt, \.\.\.\); "
                                             "choose another directory or remove them yourself"):
            prepare_output_dir(str(d), "checkpoint", overwrite=overwrite)
    assert (d / "notes.txt").read_text() == "mine"


def test_same_kind_is_accepted_other_kind_needs_overwrite(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)}, extra={"x": 1})
    marker = json.load(open(os.path.join(p, MARKER)))
    assert marker["kind"] == "checkpoint" and sorted(marker["files"]) == [f for f in _files(p) if f != MARKER]
    assert prepare_output_dir(p, "checkpoint") == p
    with pytest.raises(ValueError, match="lowbit checkpoint output.*--overwrite"):
        prepare_output_dir(p, "export-gptq")
    assert prepare_output_dir(p, "export-gptq", overwrite=True) == p
    # one file lowbit did not write makes the whole directory foreign
    os.makedirs(os.path.join(p, "arrays", "mine"))
    open(os.path.join(p, "arrays", "mine", "notes.txt"), "w").close()
    with pytest.raises(ValueError, match=r"\(arrays/mine/notes.txt\)"):
        prepare_output_dir(p, "checkpoint", overwrite=True)
    # a damaged marker is no marker
    os.remove(os.path.join(p, "arrays", "mine", "notes.txt"))
    open(os.path.join(p, MARKER), "w").write("{")
    with pytest.raises(ValueError, match="did not write"):
        prepare_output_dir(p, "checkpoint")


def test_protected_directories_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for p, why in ((".", "working directory"), (str(work), "working directory"), ("..", "home directory"),
                   (str(tmp_path), "working directory")):
        with pytest.raises(ValueError, match=why):
            prepare_output_dir(p, "checkpoint", overwrite=True)
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(ValueError, match="home directory"):
        prepare_output_dir(str(tmp_path / "home"), "checkpoint", overwrite=True)
    with pytest.raises(ValueError, match="filesystem root"):
        prepare_output_dir("/", "checkpoint", overwrite=True)


def test_files_in_the_way(tmp_path):
    (tmp_path / "a").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*a: is a file, expected a directory$"):
        prepare_output_dir(str(tmp_path / "a"), "checkpoint")
    with pytest.raises(ValueError, match=r"^--out .*a/b/c: .*a is a file$"):
        prepare_output_dir(str(tmp_path / "a" / "b" / "c"), "checkpoint")
    with pytest.raises(ValueError, match=r"is a directory, expected a file"):
        prepare_output_file(str(tmp_path))
    with pytest.raises(ValueError, match=r"a is a file"):
        prepare_output_file(str(tmp_path / "a" / "e.json"))
    assert prepare_output_file(str(tmp_path / "new" / "e.json")) == str(tmp_path / "new" / "e.json")


def test_unwritable_parent_is_a_one_line_value_error(tmp_path, monkeypatch):
    real_open = os.open

    def ro_open(p, flags, *a, **k):
        if os.path.basename(p).startswith(".lowbit-probe"):
            raise OSError(errno.EROFS, "Read-only file system", p)
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(outputs.os, "open", ro_open)
    for f in (lambda: prepare_output_dir(str(tmp_path / "out"), "checkpoint"),
              lambda: prepare_output_file(str(tmp_path / "e.json"))):
        with pytest.raises(ValueError, match=r"cannot write .*Read-only file system$"):
            f()
    monkeypatch.undo()
    if not os.access("/sys", os.W_OK) or os.geteuid() == 0:  # /sys refuses new entries, even to root
        try:
            os.mkdir("/sys/.lowbit-test")
            os.rmdir("/sys/.lowbit-test")
        except OSError:
            with pytest.raises(ValueError, match=r"^--out /sys/lowbit-out/ck: cannot write"):
                prepare_output_dir("/sys/lowbit-out/ck", "checkpoint")


# ----------------------------------------------------------------------------- the writers check too


def test_save_and_export_never_replace_foreign_directories(tmp_path, monkeypatch):
    d = _foreign(tmp_path, "notes.txt")
    with pytest.raises(ValueError, match="did not write"):
        checkpoint.save(str(d), {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="did not write"):
        checkpoint.save(str(d), {"a": jnp.ones(3)}, overwrite=True)
    assert _files(d) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    work = _foreign(tmp_path / "out", "data.txt")
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="working directory"):
        checkpoint.save(".", {"a": jnp.ones(3)})
    assert _files(work) == ["data.txt"]


def test_extra_files_are_written_inside_and_listed(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3)}, extra_files={"layers.csv": "layer\n0\n"})
    assert open(os.path.join(p, "layers.csv")).read() == "layer\n0\n"
    assert "layers.csv" in json.load(open(os.path.join(p, MARKER)))["files"]
    for bad in ("manifest.json", "../x", "/abs", MARKER, "arrays/x"):
        with pytest.raises(ValueError, match="extra_files"):
            checkpoint.save(str(tmp_path / "ck2"), {"a": jnp.ones(3)}, extra_files={bad: "x"})
    assert checkpoint.restore(p)["a"].shape == (3,)


# ----------------------------------------------------------------------------- CLI


def test_cli_refuses_foreign_out_before_loading(tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    d = _foreign(tmp_path, "notes.txt")
    q = ["quantize", "--model", MISSING_MODEL, "--method", "rtn", "--bits", "4"]
    for extra in ([], ["--overwrite"]):
        assert main(q + ["--out", str(d)] + extra) == 2
        err = capsys.readouterr().err
        assert f"--out {d} holds files lowbit did not write (notes.txt)" in err and "lowbit-model" not in err
        assert main(["export", MISSING_MODEL, "--out", str(d)] + extra) == 2
        err = capsys.readouterr().err
        assert "lowbit did not write (notes.txt)" in err and "lowbit-model" not in err
    assert _files(d) == ["notes.txt"]
    monkeypatch.chdir(d)
    assert main(q + ["--out", ".", "--overwrite"]) == 2
    assert "working directory" in capsys.readouterr().err
    assert _files(d) == ["notes.txt"]
    assert main(q + ["--out", "notes.txt/ck"]) == 2
    assert "--out notes.txt/ck: notes.txt is a file" in capsys.readouterr().err
    assert main(["eval", "--model", MISSING_MODEL, "--data", "x", "--out", str(tmp_path)]) == 2
    assert "is a directory, expected a file" in capsys.readouterr().err
    assert main(["eval", "--model", MISSING_MODEL, "--data", "x", "--out", "notes.txt/e.json"]) == 2
    assert "notes.txt is a file" in capsys.readouterr().err


def test_cli_outputs_carry_markers_and_kinds_are_kept_apart(tiny_experiment, tmp_path, capsys):
    from lowbit.cli import main

    root, _ = tiny_experiment
    ck, hf = str(tmp_path / "ck"), str(tmp_path / "hf")
    q = ["quantize", "--model", str(root / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
         "--calib", str(root / "corpus.txt"), "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    assert main(q + ["--out", ck]) == 0
    marker = json.load(open(os.path.join(ck, MARKER)))
    assert marker["kind"] == "checkpoint" and "layers.csv" in marker["files"]
    assert sorted(marker["files"]) == [f for f in _files(ck) if f != MARKER]
    assert main(q + ["--out", ck]) == 0  # its own output: replaced
    assert main(["export", ck, "--out", hf]) == 0
    assert json.load(open(os.path.join(hf, MARKER)))["kind"] == "export-gptq"
    assert main(["export", ck, "--out", hf]) == 0
    capsys.readouterr()
    assert main(q + ["--out", hf]) == 2
    assert "export-gptq" in capsys.readouterr().err and os.path.isfile(os.path.join(hf, "model.safetensors"))
    assert main(["export", ck, "--out", ck]) == 2
    assert main(q + ["--out", hf, "--overwrite"]) == 0
    assert json.load(open(os.path.join(hf, MARKER)))["kind"] == "checkpoint"
