"""Stage manifests: skip a finished stage, resume an unfinished one, refuse a changed config or input."""

from __future__ import annotations

import json

import pytest

from sppd_megatron.pipeline.manifest import StageConflict, code_version, fingerprint, read_manifest, run_stage


def _body(out, calls):
    def body():
        calls.append(1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.txt").write_text("made")
        return {"result": out / "result.txt"}

    return body


def test_done_stage_is_skipped_and_records_hashes(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("abc")
    calls: list[int] = []
    stage = tmp_path / "stage"
    out1 = run_stage(stage, "s", {"k": 1}, {"src": src}, _body(stage, calls), log=lambda _: None)
    out2 = run_stage(stage, "s", {"k": 1}, {"src": src}, _body(stage, calls), log=lambda _: None)
    assert calls == [1] and out1 == out2
    m = read_manifest(stage)
    assert m["status"] == "done" and m["config"] == {"k": 1}
    assert m["inputs"]["src"]["sha256"] == fingerprint(src)
    assert m["outputs"]["result"]["sha256"] == fingerprint(stage / "result.txt")
    assert m["code_version"] == code_version() and m["code_version"].startswith("0.")


def test_changed_config_or_input_is_refused(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("abc")
    stage = tmp_path / "stage"
    run_stage(stage, "s", {"k": 1, "nested": {"a": 1}}, {"src": src}, _body(stage, []), log=lambda _: None)
    with pytest.raises(StageConflict, match=r"config\.nested\.a: 1 -> 2"):
        run_stage(stage, "s", {"k": 1, "nested": {"a": 2}}, {"src": src}, _body(stage, []), log=lambda _: None)
    src.write_text("abd")
    with pytest.raises(StageConflict, match="input src"):
        run_stage(stage, "s", {"k": 1, "nested": {"a": 1}}, {"src": src}, _body(stage, []), log=lambda _: None)


def test_unfinished_stage_resumes_and_refuses_other_config(tmp_path):
    stage = tmp_path / "stage"

    def crash():
        raise KeyboardInterrupt  # a kill: the manifest stays "running"

    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, "s", {"k": 1}, {}, crash, log=lambda _: None)
    assert read_manifest(stage)["status"] == "running"
    with pytest.raises(StageConflict, match="started"):
        run_stage(stage, "s", {"k": 2}, {}, _body(stage, []), log=lambda _: None)
    calls: list[int] = []
    run_stage(stage, "s", {"k": 1}, {}, _body(stage, calls), log=lambda _: None)
    assert calls == [1] and read_manifest(stage)["status"] == "done"


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        run_stage(tmp_path / "s", "s", {}, {"x": tmp_path / "nope"}, lambda: {}, log=lambda _: None)


def test_directory_fingerprint_sees_content_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("1")
    first = fingerprint(d)
    (d / "a").write_text("2")
    second = fingerprint(d)
    (d / "a").rename(d / "b")
    assert len({first, second, fingerprint(d)}) == 3
    json.dumps(first)


def test_display_only_keys_do_not_count_as_a_change(tmp_path):
    stage = tmp_path / "stage"
    calls: list[int] = []
    run_stage(stage, "s", {"k": 1, "progress": True, "sub": {"progress": True}}, {}, _body(stage, calls), log=lambda _: None)
    run_stage(stage, "s", {"k": 1, "progress": False, "sub": {"progress": False}}, {}, _body(stage, calls), log=lambda _: None)
    assert calls == [1]
