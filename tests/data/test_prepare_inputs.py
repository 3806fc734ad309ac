"""`dpls prepare files` never turns bytes into text silently: another encoding or binary data
is an error naming the file, before anything is written; --encoding reads other encodings."""

from __future__ import annotations

import os

from dpls.cli import main


def _error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_latin1_text_is_refused_with_the_way_to_read_it(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café naïve résumé\n".encode("latin-1") * 50)
    latin.with_name("b.txt").write_text("an ordinary file\n")
    err = _error(
        capsys, "prepare", "files", str(latin), str(latin.with_name("b.txt")), "--out", str(tmp_path / "o")
    )
    assert "latin.txt" in err and "not UTF-8" in err and "--encoding" in err
    assert not (tmp_path / "o").exists()


def test_random_bytes_are_not_a_document(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("plain text\n" * 20)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(4000))
    for extra in ((), ("--encoding", "latin-1")):
        err = _error(
            capsys,
            "prepare",
            "files",
            str(tmp_path / "ok.txt"),
            str(noise),
            "--out",
            str(tmp_path / "o"),
            *extra,
        )
        assert "noise.txt" in err and "binary" in err
    assert not (tmp_path / "o").exists()


def test_encoding_option_reads_latin1(tmp_path):
    from dpls.data.tokenizer import load_tokenizer

    for i in range(4):
        (tmp_path / f"d{i}.txt").write_bytes(f"café numéro {i}, déjà vu\n".encode("latin-1") * 40)
    out = tmp_path / "o"
    assert (
        main(
            [
                "prepare",
                "files",
                *(str(tmp_path / f"d{i}.txt") for i in range(4)),
                "--out",
                str(out),
                "--encoding",
                "latin-1",
                "--vocab-size",
                "300",
                "--val-fraction",
                "0.25",
                "--quiet",
                "--shard-tokens",
                "512",
            ]
        )
        == 0
    )
    tok = load_tokenizer(out)
    assert "café" in tok.decode(tok.encode("café"))
    assert "\ufffd" not in (tmp_path / "o" / "tokenizer.json").read_text(encoding="utf-8")
