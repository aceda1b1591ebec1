"""Bad input is one line and exit code 2, never a traceback: teacher URLs, repeated list options."""
import importlib.util

import pytest

from conftest import invoke

needs_httpx = pytest.mark.skipif(importlib.util.find_spec("httpx") is None, reason="needs httpx")


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@needs_httpx
@pytest.mark.parametrize("url, says", [
    ("http://alice-user:hunter2-pw@127.0.0.1:8080", "put the service's token in the PIPELINE_TEACHER_TOKEN"),
    ("http://hunter2-pw@127.0.0.1:8080/v2/models/teacher", "put the service's token in the PIPELINE_TEACHER_TOKEN"),
    ("http://alice-user:hunter2-pw@127.0.0.1:99999", "put the service's token"),
    ("http://127.0.0.1:99999", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:0", "port must be a number from 1 to 65535"),
    ("https://127.0.0.1:http", "port must be a number from 1 to 65535"),
    ("http://[::1:8080", "not a valid URL"),
])
def test_bad_teacher_urls_are_one_line_that_never_echoes_credentials(url, says, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEACHER_TOKEN", "the-real-token")
    for args in (("extract", "--data", dataset, "--run", tmp_path / "run", "--teacher", url),
                 ("run", "--data", dataset, "--run", tmp_path / "run", "--teacher", url)):
        result = invoke(*args)
        line = one_error_line(result)
        assert says in line, line
        for secret in ("alice-user", "hunter2-pw", "the-real-token"):
            assert secret not in result.output
    assert not (tmp_path / "run" / "extract" / "teacher.h5").exists()


@pytest.mark.parametrize("option, value, named", [
    ("--seeds", "0,0", "--seeds names 0 more than once"),
    ("--seeds", "1,2,01", "--seeds names 1 more than once"),  # the same seed, spelled twice
    ("--methods", "zeroshot,erm,erm", "--methods names erm more than once"),
    ("--holdouts", "photo,sketch,photo", "--holdouts names photo more than once"),
])
def test_repeated_list_values_are_refused_before_any_work(option, value, named, tmp_path):
    # refused before the dataset is even looked for, and before the run folder is made
    result = invoke("run", "--data", tmp_path / "no-such-dataset", "--run", tmp_path / "run", option, value)
    assert named in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_distinct_seeds_still_parse():
    from pipeline.protocol import resolve_settings
    _, methods, seeds = resolve_settings(False, {}, "zeroshot,erm", "2, 0,1", None)
    assert methods == ["zeroshot", "erm"] and seeds == [2, 0, 1]
