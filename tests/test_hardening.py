"""Bad input is one line and exit code 2; damaged bookkeeping files are named or skipped, never a
traceback: teacher URLs, repeated list options, a damaged index.parquet, a damaged results.jsonl."""
import importlib.util
import json

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


def _flip(path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped in the middle", "flipped in a data page",
                                    "flipped in the metadata"])
def test_damaged_index_is_one_line_naming_it_and_extract_rebuilds_it(damage, run_copy, dataset, teacher_dir):
    index = run_copy / "extract" / "index.parquet"
    data = index.read_bytes()
    teacher_cache = (run_copy / "extract" / "teacher.h5").read_bytes()
    if damage == "truncated":
        index.write_bytes(data[:len(data) // 2])
    else:
        pages_end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # where the footer starts
        offset = {"flipped in the middle": (4 + pages_end) // 2, "flipped in a data page": 40,
                  "flipped in the metadata": data.index(b'"domains"') + 3}[damage]
        _flip(index, offset)
    for args in (("info", "--run", run_copy),
                 ("align", "--run", run_copy, "--holdout", "photo", "--student", "test_resnet",
                  "--student-weights", "none", "--student-size", 32, "--steps", 2, "--workers", 0)):
        line = one_error_line(invoke(*args))
        assert f"{index} is damaged (" in line, line
        assert f"run `pipeline extract --data ROOT --run {run_copy}` with the same settings" in line, line
    # the advice works, and the finished teacher cache is kept, not recomputed
    rebuilt = invoke("extract", "--data", dataset, "--run", run_copy, "--teacher", f"local-dir:{teacher_dir}",
                     "--views", 3, "--workers", 0, "--batch-size", 16)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (run_copy / "extract" / "teacher.h5").read_bytes() == teacher_cache
    assert invoke("info", "--run", run_copy).exit_code == 0


def test_no_flipped_byte_of_an_index_is_read_as_different_content(extracted, tmp_path):
    """Every byte of an index flipped in turn: each read is either refused or the same content
    (a flip in a statistic or padding changes nothing that is read)."""
    from cache.errors import UserError
    from cache.index import read_table
    original = (extracted / "extract" / "index.parquet").read_bytes()
    expected = read_table(extracted / "extract" / "index.parquet")
    path = tmp_path / "index.parquet"
    outcomes = {"refused": 0, "same": 0}
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)  # every bit position, across the file
        path.write_bytes(bytes(data))
        try:
            got = read_table(path)
        except UserError as e:
            assert str(e).startswith(f"{path} is damaged ("), e
            outcomes["refused"] += 1
            continue
        assert got == expected, f"byte {offset} flipped was read as different content"
        outcomes["same"] += 1
    print(f"\nindex: {len(original)} bytes flipped one at a time: {outcomes}")
    assert outcomes["refused"] > len(original) // 2


def test_a_damaged_results_line_is_skipped_with_a_warning_and_restored(run_copy):
    results = run_copy / "results.jsonl"

    def evaluate(holdout):
        return invoke("evaluate", "--run", run_copy, "--method", "zeroshot", "--holdout", holdout)

    for holdout in ("photo", "sketch", "cartoon"):
        assert evaluate(holdout).exit_code == 0
    lines = results.read_bytes().split(b"\n")
    rows = [json.loads(line) for line in lines[:3]]
    for mask, line_number in ((0x01, 2), (0x80, 1)):  # ':' -> ';' (bad JSON), then a non-UTF-8 byte
        damaged = bytearray(results.read_bytes())
        start = sum(len(line) + 1 for line in lines[:line_number - 1])
        middle = damaged.index(b":", start + len(lines[line_number - 1]) // 2)
        damaged[middle] ^= mask
        results.write_bytes(bytes(damaged))
        holdout = rows[line_number - 1]["holdout"]
        result = evaluate(holdout)  # up to date: only checks its row is in results.jsonl
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        assert f"warning: {results} line {line_number} is damaged" in result.output, result.output
        assert "its row was missing" in result.output  # restored from the evaluation's metrics.json
        from cache import jsonl
        kept = jsonl.rows(results)
        assert all(row in kept for row in rows), kept  # every row, the damaged one restored
        assert bytes(damaged) in results.read_bytes()  # nothing removed, the damaged line included
    assert len(results.read_bytes().split(b"\n")) == 3 + 2 + 1
