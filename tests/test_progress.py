"""dipddpm.progress.bar: tqdm's bar at a terminal; few plain lines in a log file or under SLURM."""
import io

from dipddpm.progress import bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, n=2000, **kw) -> str:
    with bar(n, "work", file=stream, **kw) as b:
        for i in range(n):
            b.update(1)
            if i % 100 == 0:  # a postfix or description waits for the next line in a log
                b.set_postfix(i=i)
                b.set_description(f"work {i // 1000}")
    return stream.getvalue()


def test_a_log_file_gets_a_line_at_the_start_and_one_at_the_end(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = _run(io.StringIO())
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 2, out
    assert "0/2000" in lines[0] and "2000/2000" in lines[1]


def test_a_terminal_gets_tqdms_redrawn_bar(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = _run(Terminal())
    assert out.count("\r") >= 2 and "2000/2000" in out  # one line, redrawn in place


def test_under_slurm_even_a_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    out = _run(Terminal())
    assert "\r" not in out and len(out.splitlines()) == 2, out


def test_a_short_inner_bar_prints_nothing_in_a_log_and_disable_prints_nothing(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert _run(io.StringIO(), leave=False) == ""
    monkeypatch.delenv("SLURM_JOB_ID")
    assert _run(Terminal(), disable=True) == ""
