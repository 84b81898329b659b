"""Command-line mistakes are one line and exit status 1, never a traceback or a silent default."""

from __future__ import annotations

import pytest

from fedlinear.scripts.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--clients", "0"], "--clients must be >= 1, got 0"),
        (["run", "--clients", "-1"], "--clients must be >= 1, got -1"),
        (["run", "--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["run", "--test", "/t.csv", "--set", "test-uri=/u.csv"], "give the test set one way: --test or --set test-uri, not both"),
    ],
)
def test_run_refuses_nonsense_counts_before_doing_anything(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fedlinear: error: {message}"
    assert not out.exists()  # nothing synthesised, nothing written


def test_split_into_zero_clients_is_an_error(tmp_path, capsys):
    source = tmp_path / "t.csv"
    source.write_text("1,2\n3,4\n5,6\n")
    assert main(["data", "split", str(source), "--clients", "0", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == "fedlinear: error: the number of clients must be >= 1, got 0"


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "synth", "--out", str(blocker / "sub"), "--clients", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedlinear: error: ") and err.count("\n") == 1 and "Traceback" not in err
