"""Progress reports: a bar on a terminal, a few plain lines when output goes to a file."""
import subprocess
import sys

from detector.progress import LineProgress, progress_bar


def test_redirected_run_prints_a_line_per_ten_percent(capsys, monkeypatch):
    monkeypatch.delenv("SPP_PROGRESS", raising=False)
    items = list(progress_bar(range(250), desc="work", unit="img"))  # pytest's stderr is not a terminal
    assert items == list(range(250))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert len(lines) == 10  # 10%, 20%, ..., 100%
    assert lines[0].startswith("work: 10% (25/250 img)")
    assert lines[-1].startswith("work: 100% (250/250 img)")


def test_update_postfix_initial_and_early_close(capsys):
    bar = LineProgress(total=40, desc="fine-tune", unit="it", initial=20)
    for _ in range(10):
        bar.update(1)
    bar.set_postfix(loss="0.123")
    bar.close()  # stopped at 30 of 40: the last line says where
    lines = capsys.readouterr().err.splitlines()
    # a resumed run starts at 50% and reports from the next step on
    assert [ln.split(" (")[0] for ln in lines] == ["fine-tune: 60%", "fine-tune: 70%", "fine-tune: 75%"]
    assert lines[-1].endswith("loss=0.123")


def test_disabled_and_none_print_nothing(capsys, monkeypatch):
    assert sum(progress_bar(range(5), disable=True)) == 10
    monkeypatch.setenv("SPP_PROGRESS", "none")
    assert sum(progress_bar(range(5), desc="x")) == 10
    assert capsys.readouterr().err == ""


def test_tool_output_to_a_file_has_no_carriage_returns(tmp_path):
    code = ("from detector.progress import progress_bar\n"
            "for _ in progress_bar(range(1000), desc='loop'): pass\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", code], stderr=fh, check=True)
    text = log.read_text()
    assert "\r" not in text and len(text.splitlines()) == 10
