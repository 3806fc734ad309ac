"""A dpls command overwrites or deletes only what dpls wrote; bad output paths are one-line errors.

Each case runs the command line on a tiny cached run and checks that every file the user
owns survives byte for byte, the exit status is 2 and the message says what to do.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from data_helpers import make_text_data, train_tiny_run
from dpls._io import OWNED_FILE, check_replaceable, is_owned, mark_owned, write_owned_text, write_text_atomic
from dpls.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_files")
    return train_tiny_run(make_text_data(root / "data"), root / "run", steps=4)


def fails(capsys, *argv: str) -> str:
    """The command exits 2 with a one-line message (returned)."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the shared mechanism -------------------------------------------------------------------------


def test_only_files_dpls_wrote_and_nobody_changed_are_replaceable(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text("{}")
    with pytest.raises(ValueError, match="not written by dpls"):
        check_replaceable(mine)
    ours = write_owned_text(tmp_path / "out.json", "{}")
    assert is_owned(ours) and check_replaceable(ours) == ours
    ours.write_text('{"edited": 1}')  # edited by the user: theirs now
    assert not is_owned(ours)
    with pytest.raises(ValueError, match="changed since"):
        check_replaceable(ours)
    with pytest.raises(ValueError, match="is a directory"):
        check_replaceable(tmp_path)
    assert check_replaceable(tmp_path / "new" / "x.json", create=True)  # a folder to create is fine
    with pytest.raises(ValueError, match="does not exist"):
        check_replaceable(tmp_path / "new" / "x.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file is in the way"):
        check_replaceable(tmp_path / "file" / "x.json", create=True)
    mark_owned(tmp_path / "missing.json")  # nothing to record, no error
    assert json.loads((tmp_path / OWNED_FILE).read_text())["files"].keys() == {"out.json"}


def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: be another user
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)
    with pytest.raises(ValueError, match="no permission to write"):
        check_replaceable(locked / "x.json")


def test_atomic_writes_respect_the_umask(tmp_path):
    before = os.umask(0o027)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o002)
        path = write_text_atomic(tmp_path / "b.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(before)


# -- bench --json (item 1) ------------------------------------------------------------------------


def test_bench_json_never_overwrites_a_users_file(tmp_path, capsys):
    script = tmp_path / "f"
    script.write_text("x\n")
    base = ["bench", "loss", "--n=16", "--v=100", "--repeats=1", "--no-memory", "--device=cpu"]
    assert "not written by dpls" in fails(capsys, *base, f"--json={script}")
    assert script.read_text() == "x\n"
    out = tmp_path / "b.json"
    assert main([*base, f"--json={out}"]) == 0
    assert main([*base, f"--json={out}"]) == 0  # its own earlier output: replaced
    assert json.loads(out.read_text())["rows"]
    assert "not written by dpls" in fails(capsys, "bench", "train", "--presets=tiny", f"--json={script}")


def test_bench_train_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    text = capsys.readouterr().out
    assert "tokens/s" in text
    blocks = ("\n" + text.split("options:", 1)[1]).split("\n  -")[1:]  # one per option
    for option in ("-batch-size", "-block-size", "-steps", "-warmup", "-epsilon", "-top-k", "-json"):
        block = next(b for b in blocks if b.startswith(option + " "))
        assert len(" ".join(block.split()[2:])) > 10, block  # a help text after "--opt METAVAR"


# -- compare / study report folders (items 2, 13, 21) -----------------------------------------------


def test_compare_never_replaces_a_users_report(run, tmp_path, capsys):
    out = tmp_path / "u"
    out.mkdir()
    (out / "report.md").write_text("mine")
    assert "report.md" in fails(capsys, "compare", str(run), f"--out={out}")
    assert (out / "report.md").read_text() == "mine" and not (out / "summary.json").exists()

    fresh = tmp_path / "fresh"
    assert main(["compare", str(run), f"--out={fresh}"]) == 0
    assert main(["compare", str(run), f"--out={fresh}"]) == 0  # its own report: replaced
    (fresh / "summary.json").write_text("{}")  # edited by the user
    assert "summary.json" in fails(capsys, "compare", str(run), f"--out={fresh}")
    assert (fresh / "summary.json").read_text() == "{}"


def test_compare_out_is_an_existing_file(run, tmp_path, capsys):
    target = tmp_path / "existing"
    target.write_text("keep")
    assert "not a directory" in fails(capsys, "compare", str(run), f"--out={target}")
    assert target.read_text() == "keep"


def test_compare_names_a_broken_config(run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    with (broken / "config.toml").open("a") as fh:
        fh.write("a = = 1\n")
    assert "config.toml" in fails(capsys, "compare", str(broken), f"--out={tmp_path / 'r'}")


# -- export-hf --force (items 3, 19, 24) ----------------------------------------------------------


def test_export_force_replaces_only_an_earlier_export(run, tmp_path, capsys, monkeypatch):
    regular = tmp_path / "f"
    regular.write_text("hi\n")
    assert "not a directory" in fails(capsys, "export-hf", str(run), str(regular), "--force")
    assert regular.read_text() == "hi\n"

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\section{}")
    assert "thesis.tex" in fails(capsys, "export-hf", str(run), str(thesis), "--force")
    assert (thesis / "thesis.tex").read_text() == "\\section{}"

    export = tmp_path / "hf"
    assert main(["export-hf", str(run), str(export)]) == 0
    assert "--force" in fails(capsys, "export-hf", str(run), str(export))
    assert main(["export-hf", str(run), str(export), "--force"]) == 0  # an earlier export
    (export / "notes.txt").write_text("mine")
    assert "notes.txt" in fails(capsys, "export-hf", str(run), str(export), "--force")
    assert (export / "notes.txt").read_text() == "mine"

    monkeypatch.chdir(export)
    assert "current folder" in fails(capsys, "export-hf", str(run), ".", "--force")


def test_export_files_are_readable_by_others(run, tmp_path):
    before = os.umask(0o022)
    try:
        assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(before)
    for f in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_run_files_are_readable_by_others(run):
    from dpls._io import current_umask

    if current_umask() & 0o004:
        pytest.skip("this umask makes files private on purpose")
    for f in run.rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & stat.S_IROTH, f


# -- eval outputs (items 4, 22) -------------------------------------------------------------------


def test_eval_never_replaces_a_users_png_and_removes_its_own_stale_ones(run, tmp_path, capsys):
    out = tmp_path / "s" / "n.json"
    out.parent.mkdir()
    figure = tmp_path / "s" / "n_entropy.png"
    figure.write_bytes(b"my figure")
    args = ["eval", str(run), "--device=cpu", "--tokens=128"]
    assert "n_entropy.png" in fails(capsys, *args, f"--out={out}")
    assert figure.read_bytes() == b"my figure" and not out.exists()
    figure.unlink()
    assert main([*args, f"--out={out}"]) == 0
    assert figure.is_file()
    assert main([*args, f"--out={out}", "--no-plots"]) == 0  # no stale figure beside new numbers
    assert not figure.exists() and out.is_file()


def test_eval_writes_into_the_run_by_default(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), "--device=cpu", "--tokens=128", "--no-plots"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert (run / "eval" / "metrics.json").is_file()
    step = sorted((run / "checkpoints").iterdir())[-1]
    assert main(["eval", str(step), "--device=cpu", "--tokens=128", "--no-plots"]) == 0
    assert (run / "eval" / f"{step.name}.json").is_file()
