"""The one JSON reader: the value, or the caller's own error naming the file and the fault."""

from __future__ import annotations

import pytest

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.io.json_files import read_json


def test_read_json_returns_the_object_or_the_list_asked_for(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"file_name": "v.mp4"}]', encoding="utf-8")
    assert read_json(tmp_path / "a.json", LoRAError) == {"x": [1, 2]}
    assert read_json(tmp_path / "b.json", LoRAError, expect=list) == [{"file_name": "v.mp4"}]


@pytest.mark.parametrize(
    ("content", "expect", "message"),
    [
        ('{"x": 1,}', dict, "not valid JSON (Expecting property name"),
        (b"\xff\xfe{", dict, "cannot be read"),
        ("[1, 2]", dict, "expected a JSON object of rows, found a list"),
        ('{"x": 1}', list, "expected a JSON list of rows, found a dict"),
    ],
    ids=["trailing-comma", "not-utf8", "list-for-object", "object-for-list"],
)
def test_read_json_raises_the_callers_error_naming_the_file_and_the_fault(tmp_path, content, expect, message):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LoRAError) as info:
        read_json(path, LoRAError, expect=expect, shape="of rows")
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_read_json_names_a_missing_file_and_refuses_kinds_other_than_object_or_list(tmp_path):
    with pytest.raises(LoRAError, match="missing.json: cannot be read"):
        read_json(tmp_path / "missing.json", LoRAError)
    with pytest.raises(ValueError, match="expect must be dict or list"):
        read_json(tmp_path / "missing.json", LoRAError, expect=str)
