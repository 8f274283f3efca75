"""TOFU as a data source: the shared real copy, a local directory in either JSON format, the
hub code path (with ``datasets.load_dataset`` replaced), and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.core.errors import DataError, UsageError
from benchmarks.core.tofu_data import (
    PAIRS_PER_AUTHOR,
    is_tofu_source,
    load_tofu,
    resolve_tofu_source,
    role_configs,
)

SHARED_TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "tofu"


@pytest.fixture(scope="module")
def shared_tofu():
    if not (SHARED_TOFU / "forget10.json").is_file():
        pytest.skip(f"TOFU copy not found at {SHARED_TOFU} (needs ../shared/tofu)")
    return load_tofu(str(SHARED_TOFU), "forget10")


def test_shared_copy_loads_with_the_published_sizes(shared_tofu):
    sizes = {role: len(split) for role, split in shared_tofu.splits.items()}
    assert sizes == {"forget": 400, "retain": 3600, "forget_perturbed": 400, "retain_perturbed": 400,
                     "real_authors": 100, "world_facts": 117}
    authors = shared_tofu.forget_authors()
    assert authors == list(range(180, 200))
    for author in authors:
        assert len(shared_tofu.forget.of_authors([author])) == PAIRS_PER_AUTHOR
    assert shared_tofu.forget.items[0].question.startswith("What is the full name of the author born in Taipei")
    # forget and retain share no author and no question
    assert not set(authors) & set(shared_tofu["retain"].authors())
    assert not {i.question for i in shared_tofu.forget.items} & {i.question for i in shared_tofu["retain"].items}
    # the perturbed split is row for row the forget split, with 5 wrong answers and a paraphrase
    for plain, pert in zip(shared_tofu.forget.items, shared_tofu["forget_perturbed"].items):
        assert (plain.question, plain.author) == (pert.question, pert.author)
        assert len(pert.perturbed_answers) == 5 and pert.paraphrased_answer
    assert {len(i.perturbed_answers) for i in shared_tofu["real_authors"].items} == {3}
    assert shared_tofu["real_authors"].items[0].author is None


def test_shared_copy_file_digests_match_its_readme(shared_tofu):
    readme = (SHARED_TOFU / "README.md").read_text()
    for split in shared_tofu.splits.values():
        assert f"{split.file_sha256}  {split.config}.json" in readme


def _write(directory: Path, config: str, rows: list, as_array: bool = False) -> None:
    text = json.dumps(rows) if as_array else "\n".join(json.dumps(r) for r in rows) + "\n"
    (directory / f"{config}.json").write_text(text)


def _tiny_dir(tmp_path: Path, as_array: bool = False) -> Path:
    qa = lambda n, tag: [{"question": f"{tag} q{i}?", "answer": f"{tag} a{i}."} for i in range(n)]  # noqa: E731
    pert = lambda rows, k: [dict(r, paraphrased_answer=r["answer"] + " (p)",  # noqa: E731
                                 perturbed_answer=[f"wrong {j}" for j in range(k)]) for r in rows]
    forget, retain = qa(40, "f"), qa(60, "r")
    _write(tmp_path, "forget01", forget, as_array)
    _write(tmp_path, "retain99", retain, as_array)
    _write(tmp_path, "forget01_perturbed", pert(forget, 5), as_array)
    _write(tmp_path, "retain_perturbed", pert(retain[:20], 5), as_array)
    _write(tmp_path, "real_authors_perturbed", [dict(r, perturbed_answer=["x", "y", "z"]) for r in qa(3, "ra")], as_array)
    _write(tmp_path, "world_facts_perturbed", [dict(r, perturbed_answer=["x", "y", "z"]) for r in qa(4, "wf")], as_array)
    return tmp_path


@pytest.mark.parametrize("as_array", [False, True])
def test_local_directory_in_json_lines_or_array(tmp_path, as_array):
    data = load_tofu(str(_tiny_dir(tmp_path, as_array)), "forget01")
    assert data.kind == "dir"
    assert data.forget_authors() == [198, 199]  # forget01 = the last two authors
    assert data["retain"].authors() == [0, 1, 2]
    assert [i.author for i in data.forget.items[18:22]] == [198, 198, 199, 199]


def test_json_lines_and_array_give_the_same_record_digest(tmp_path):
    (tmp_path / "lines").mkdir()
    (tmp_path / "array").mkdir()
    lines = load_tofu(str(_tiny_dir(tmp_path / "lines", as_array=False)), "forget01")
    array = load_tofu(str(_tiny_dir(tmp_path / "array", as_array=True)), "forget01")
    assert lines.forget.sha256 == array.forget.sha256
    assert lines.forget.file_sha256 != array.forget.file_sha256


def test_forget_split_picks_the_matching_configs():
    assert role_configs("forget05")["retain"] == "retain95"
    assert role_configs("forget05")["forget_perturbed"] == "forget05_perturbed"
    assert role_configs("forget10")["retain"] == "retain90"
    with pytest.raises(UsageError, match="unknown --forget-split 'forget20'; valid: forget01, forget05, forget10"):
        role_configs("forget20")


def test_missing_config_is_named(tmp_path):
    directory = _tiny_dir(tmp_path)
    with pytest.raises(DataError, match=r"has no config 'forget05' \(file forget05.json\)"):
        load_tofu(str(directory), "forget05")
    if not (SHARED_TOFU / "forget10.json").is_file():
        return
    with pytest.raises(DataError, match="has no config 'forget01'"):
        load_tofu(str(SHARED_TOFU), "forget01")


def test_missing_field_is_named_with_file_and_row(tmp_path):
    directory = _tiny_dir(tmp_path)
    rows = [json.loads(line) for line in (directory / "forget01_perturbed.json").read_text().splitlines()]
    del rows[7]["paraphrased_answer"]
    _write(directory, "forget01_perturbed", rows)
    with pytest.raises(DataError) as err:
        load_tofu(str(directory), "forget01")
    message = str(err.value)
    assert "\n" not in message
    assert "forget01_perturbed.json" in message and "row 7" in message and "'paraphrased_answer'" in message


def test_hub_code_path_calls_load_dataset_per_config(tmp_path, monkeypatch):
    import datasets

    directory = _tiny_dir(tmp_path)
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        rows = [json.loads(line) for line in (directory / f"{name}.json").read_text().splitlines()]
        # the hub's column-oriented reader fills absent fields with None
        return [dict(r, paraphrased_question=None) for r in rows]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_tofu("tofu", "forget01")
    local = load_tofu(str(directory), "forget01")
    assert calls[0] == ("locuslab/TOFU", "forget01", "train")
    assert {c[1] for c in calls} == set(role_configs("forget01").values())
    assert data.kind == "hub"
    assert {r: s.sha256 for r, s in data.splits.items()} == {r: s.sha256 for r, s in local.splits.items()}


def test_source_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert resolve_tofu_source("tofu").location == "locuslab/TOFU"
    assert resolve_tofu_source("tofu-world").kind == "world"
    assert is_tofu_source(str(_tiny_dir(tmp_path)))
    assert not is_tofu_source("world") and not is_tofu_source(str(tmp_path / "nothing"))
    with pytest.raises(UsageError, match="neither 'tofu'"):
        resolve_tofu_source(str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        resolve_tofu_source("tofu")
