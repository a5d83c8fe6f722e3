"""The log-file form of progress: one line per finished phase, none for a phase an error ends
(so a failing command prints exactly its one ``error:`` line)."""
import pytest

from mergelab.progress import LineProgress


def test_one_line_per_finished_phase(capsys):
    for _ in LineProgress(range(3), desc="phase a", unit="job"):
        pass
    with LineProgress(total=2, desc="phase b") as bar:
        bar.update(2)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("phase a: 3/3 job in ") and err[1].startswith("phase b: 2/2 it")
    assert "\r" not in "".join(err)


def test_no_line_when_an_error_ends_the_phase(capsys):
    with pytest.raises(ValueError):
        for i in LineProgress(range(5), desc="loop"):
            if i == 2:
                raise ValueError
    bar = LineProgress(total=4, desc="manual")
    with pytest.raises(KeyboardInterrupt):
        try:
            bar.update(1)
            raise KeyboardInterrupt
        finally:
            bar.close()
    with pytest.raises(RuntimeError):
        with LineProgress(total=1, desc="ctx"):
            raise RuntimeError
    assert capsys.readouterr().err == ""
