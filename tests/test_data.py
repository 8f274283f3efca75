"""MUSE-News data sources: the four kinds load into one structure, with exact hashes and clear errors."""

from __future__ import annotations

import json
import re
import socket
import sys
import types
from pathlib import Path

import pytest

from benchmarks.core.data import (
    SCHEMA,
    MuseData,
    data_from_corpus,
    Split,
    load_data,
    normalize_records,
    records_sha256,
    resolve_source,
    write_hub_layout,
)
from benchmarks.core.errors import DataError, UsageError

HUB_ID = "muse-bench/MUSE-News"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def tiny_corpus() -> dict[str, dict[str, list[dict]]]:
    """A small corpus in the normalized schema, as the world generator returns it."""
    articles = [{"text": f"Article {i} about the Kelder Institute.", "doc_id": f"doc{i}"} for i in range(4)]
    return {
        "raw": {"forget": articles[:2], "retain1": articles[2:3], "retain2": articles[3:], "holdout": articles[1:3]},
        "verbmem": {"forget": [{"prompt": "Article 0 about", "gt": " the Kelder Institute.", "doc_id": "doc0"}]},
        "knowmem": {
            # doc_id on some splits and not others: the hub-layout round trip must keep that exact.
            "forget_qa": [{"question": "Which institute?", "answer": "Kelder", "doc_id": "doc0"}],
            "retain_qa": [{"question": "Which article?", "answer": "2"}],
            "forget_qa_icl": [{"question": "Q?", "answer": "A", "doc_id": "doc1"}, {"question": "R?", "answer": "B"}],
            "retain_qa_icl": [{"question": "S?", "answer": "C"}],
        },
        "privleak": {"forget": articles[:1], "retain": articles[2:3], "holdout": [{"text": "Unseen."}]},
        # an extra split outside the schema is ignored
        "extra": {"forget": [{"text": "x"}]},
    }


@pytest.fixture
def fake_world(monkeypatch):
    """Stand-in for benchmarks.core.world_corpus; records the configs it is built with."""
    built = []

    class WorldConfig:
        seed = 0

    def build_corpus(config):
        built.append(config)
        corpus = tiny_corpus()
        del corpus["privleak"]["holdout"]
        return corpus

    module = types.ModuleType("benchmarks.core.world_corpus")
    module.WorldConfig = WorldConfig
    module.build_corpus = build_corpus
    monkeypatch.setitem(sys.modules, "benchmarks.core.world_corpus", module)
    return built


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def readme_sha256(muse_dir: Path) -> dict[str, str]:
    text = (muse_dir / "README.md").read_text(encoding="utf-8")
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})  (\S+)$", text, re.MULTILINE)}


# --------------------------------------------------------------------------- resolve_source


def test_resolve_source_kinds(muse_news_dir, tmp_path, online_env):
    assert resolve_source("world").kind == "world"
    spec = resolve_source(str(muse_news_dir))
    assert (spec.kind, spec.location) == ("muse_dir", str(muse_news_dir.resolve()))
    assert (resolve_source(HUB_ID).kind, resolve_source(HUB_ID).location) == ("hub", HUB_ID)
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: raw\n  data_files: raw/*.jsonl\n---\n")
    assert resolve_source(str(tmp_path)).kind == "hub_dir"


@pytest.mark.parametrize(
    "source, words",
    [
        ("/no/such/muse-news", ["/no/such/muse-news", "existing directory"]),
        ("./muse-news-copy", ["./muse-news-copy", "existing directory"]),
        ("muse news", ["'muse news'", "hub id"]),
        ("a/b/c", ["'a/b/c'", "hub id"]),
        ("", ["empty"]),
    ],
)
def test_resolve_source_rejects_unknown(source, words, online_env):
    with pytest.raises(UsageError) as err:
        resolve_source(source)
    for word in words:
        assert word in str(err.value)


def test_resolve_source_rejects_file_empty_dir_and_offline_hub(tmp_path, monkeypatch):
    file = write_json(tmp_path / "forget.json", ["x"])
    with pytest.raises(UsageError, match="is a file"):
        resolve_source(str(file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"neither a README.md with 'configs:'.*nor <subset>/<split>.json"):
        resolve_source(str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        resolve_source(HUB_ID)


def test_unknown_subset_is_usage_error(muse_news_dir):
    with pytest.raises(UsageError, match="unknown MUSE subset 'knowledge'.*knowmem"):
        load_data(str(muse_news_dir), subsets=["knowledge"])


# --------------------------------------------------------------------------- MUSE-layout directory


@pytest.mark.muse_news
def test_muse_news_copy_loads_with_sizes_missing_splits_and_file_hashes(muse_news_dir, no_network):
    data = load_data(str(muse_news_dir))
    assert data.kind == "muse_dir" and data.source == str(muse_news_dir.resolve())
    sizes = {split.key: len(split) for split in data}
    assert sizes == {
        "raw/forget": 889,
        "verbmem/forget": 100,
        "knowmem/forget_qa": 100,
        "knowmem/retain_qa": 100,
        "knowmem/forget_qa_icl": 10,
        "knowmem/retain_qa_icl": 10,
        "privleak/forget": 100,
        "privleak/retain": 100,
        "privleak/holdout": 100,
    }
    assert set(data.missing) == {"raw/retain1", "raw/retain2", "raw/holdout"}
    assert "raw/retain1.json" in data.missing["raw/retain1"]
    assert not data.has("raw", "retain1") and data.has("raw", "forget")

    # Normalized schema: plain strings became {"text": ...}; QA and verbmem keep their fields.
    assert set(data.records("privleak", "holdout")[0]) == {"text"}
    assert set(data.records("knowmem", "forget_qa")[0]) == {"question", "answer"}
    assert set(data.records("verbmem", "forget")[0]) == {"prompt", "gt"}
    first = json.loads((muse_news_dir / "raw" / "forget.json").read_text(encoding="utf-8"))[0]
    assert data.records("raw", "forget")[0] == {"text": first}

    # File hashes are the ones the copy's README lists; record hashes are the canonical ones.
    listed = readme_sha256(muse_news_dir)
    assert len(listed) == 9
    for key, split in data.splits.items():
        assert split.file_sha256 == listed[f"{key}.json"], key
        assert split.sha256 == records_sha256(split.records)
        assert split.path == str(muse_news_dir.resolve() / f"{key}.json")
    summary = data.describe()
    assert summary["splits"]["knowmem/forget_qa"] == {
        "records": 100,
        "sha256": data.split("knowmem", "forget_qa").sha256,
        "file_sha256": "efe3e08cad69a7dd723ab08168d08abfa6137f1d3eda90ac49d6368f3f16a5af",
    }
    assert summary["missing"] == dict(data.missing)


@pytest.mark.muse_news
def test_asking_for_a_missing_split_names_it_the_source_and_what_is_available(muse_news_dir):
    data = load_data(str(muse_news_dir), subsets=["raw", "knowmem"])
    with pytest.raises(DataError) as err:
        data.split("raw", "retain1")
    message = str(err.value)
    assert "raw/retain1" in message and str(muse_news_dir.resolve()) in message
    assert "raw/forget" in message and "knowmem/forget_qa" in message
    with pytest.raises(DataError, match="privleak/forget.*not loaded"):
        data.records("privleak", "forget")


def test_subsets_filter_and_records_are_copies(tmp_path):
    write_json(tmp_path / "knowmem" / "forget_qa.json", [{"question": "q", "answer": "a", "doc_id": "d7"}])
    data = load_data(str(tmp_path), subsets="knowmem")
    assert [s.key for s in data] == ["knowmem/forget_qa"]
    assert set(data.missing) == {"knowmem/retain_qa", "knowmem/forget_qa_icl", "knowmem/retain_qa_icl"}
    records = data.records("knowmem", "forget_qa")
    assert records == [{"question": "q", "answer": "a", "doc_id": "d7"}]  # doc_id kept
    records[0]["answer"] = "changed"
    assert data.records("knowmem", "forget_qa")[0]["answer"] == "a"


def test_wrong_field_names_the_file_and_the_field(tmp_path):
    path = write_json(tmp_path / "knowmem" / "forget_qa.json", [{"question": "q", "answer": "a"}, {"question": "q", "ans": "a"}])
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path), subsets=["knowmem"])
    message = str(err.value)
    assert str(path) in message and "record 1" in message and "'answer'" in message and "ans" in message


def test_wrong_field_type_names_the_file_and_the_field(tmp_path):
    path = write_json(tmp_path / "verbmem" / "forget.json", [{"prompt": "p", "gt": 42}])
    with pytest.raises(DataError, match=re.escape(str(path)) + r".*field 'gt' is int"):
        load_data(str(tmp_path), subsets=["verbmem"])


def test_plain_string_in_a_qa_split_is_rejected(tmp_path):
    path = write_json(tmp_path / "knowmem" / "retain_qa.json", ["just text"])
    with pytest.raises(DataError, match=re.escape(str(path)) + r".*record 0 is str.*'question', 'answer'"):
        load_data(str(tmp_path), subsets=["knowmem"])


def test_malformed_json_names_the_file_and_the_position(tmp_path):
    path = tmp_path / "privleak" / "forget.json"
    path.parent.mkdir()
    path.write_text('["one",\n "two" "three"]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + r" is not valid JSON .*line 2"):
        load_data(str(tmp_path), subsets=["privleak"])


def test_not_a_list_and_empty_split_are_errors(tmp_path):
    path = write_json(tmp_path / "privleak" / "forget.json", {"text": "x"})
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*expected a JSON list.*got dict"):
        load_data(str(tmp_path), subsets=["privleak"])
    write_json(path, [])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*privleak/forget holds no records"):
        load_data(str(tmp_path), subsets=["privleak"])


# --------------------------------------------------------------------------- records and hashes


def test_normalization_and_canonical_hash():
    records = normalize_records("raw", "forget", ["a", {"text": "b", "doc_id": "d", "note": None}], "test")
    # strings wrapped, None-valued extras dropped (a column reader fills absent fields with None)
    assert records == ({"text": "a"}, {"text": "b", "doc_id": "d"})
    # the hash is that of the canonical JSON, independent of key order
    expected = __import__("hashlib").sha256(
        '[{"text":"a"},{"doc_id":"d","text":"b"}]'.encode("utf-8")
    ).hexdigest()
    assert records_sha256(records) == expected
    assert records_sha256([{"text": "a"}, {"text": "b", "doc_id": "d"}]) == expected
    assert records_sha256([{"text": "b", "doc_id": "d"}, {"text": "a"}]) != expected
    with pytest.raises(DataError, match="field 'doc_id' is int"):
        normalize_records("raw", "forget", [{"text": "a", "doc_id": 3}], "test")
    with pytest.raises(DataError, match="field 'text' is NoneType, expected a string"):
        normalize_records("privleak", "holdout", [{"text": None}], "test")


def test_schema_matches_design():
    assert {s: tuple(splits) for s, splits in SCHEMA.items()} == {
        "raw": ("forget", "retain1", "retain2", "holdout"),
        "verbmem": ("forget",),
        "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
        "privleak": ("forget", "retain", "holdout"),
        "scal": ("forget_1", "forget_2", "forget_3", "forget_4"),
        "sust": ("forget_1", "forget_2", "forget_3", "forget_4"),
    }
    assert SCHEMA["verbmem"]["forget"] == ("prompt", "gt")
    assert SCHEMA["knowmem"]["retain_qa_icl"] == ("question", "answer")


# --------------------------------------------------------------------------- world


def test_world_source_uses_the_generator(fake_world, tmp_path):
    data = load_data("world")
    assert (data.kind, data.source) == ("world", "world")
    assert len(fake_world) == 1 and type(fake_world[0]).__name__ == "WorldConfig"  # the default config
    assert data.missing == {"privleak/holdout": "not generated by the world corpus"}
    assert data.records("raw", "forget")[1] == {"text": "Article 1 about the Kelder Institute.", "doc_id": "doc1"}
    assert data.split("knowmem", "forget_qa").sha256 == records_sha256(tiny_corpus()["knowmem"]["forget_qa"])
    assert data.split("raw", "forget").file_sha256 is None
    assert "extra/forget" not in data.splits

    custom = object()
    load_data("world", subsets=["knowmem"], world_config=custom)
    assert fake_world[-1] is custom
    with pytest.raises(UsageError, match="world_config applies only"):
        load_data(str(write_json(tmp_path / "raw" / "forget.json", ["x"]).parent.parent), world_config=custom)


def test_data_from_a_built_corpus_equals_the_world_source(fake_world):
    corpus = tiny_corpus()
    del corpus["privleak"]["holdout"]
    built = data_from_corpus(corpus)
    loaded = load_data("world")
    assert built.describe() == loaded.describe()
    assert data_from_corpus(corpus, subsets=["verbmem"]).splits.keys() == {"verbmem/forget"}


def test_world_corpus_fits_the_schema_and_round_trips(tmp_path, no_network):
    """The real generator's default corpus loads with every required split present, and its
    hub-layout copy loads back to the same records."""
    pytest.importorskip("benchmarks.core.world_corpus")
    data = load_data("world")
    assert data.missing == {}
    for split in data:
        assert len(split) > 0
    back = load_data(str(write_hub_layout(data, tmp_path / "world")))
    assert {k: s.sha256 for k, s in back.splits.items()} == {k: s.sha256 for k, s in data.splits.items()}


# --------------------------------------------------------------------------- hub id (dispatch only: no network here)


def test_hub_id_is_loaded_with_datasets_load_dataset(monkeypatch, online_env):
    import datasets

    calls = []
    corpus = tiny_corpus()

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        if name not in corpus or name == "scal":
            raise ValueError(f"BuilderConfig '{name}' not found. Available: {list(corpus)}")
        if split == "retain2":
            raise ValueError(f'Unknown split "{split}". Should be one of {list(corpus[name])}.')
        return datasets.Dataset.from_list(corpus[name][split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_data(HUB_ID, subsets=["raw", "knowmem", "scal"])
    assert (data.kind, data.source) == ("hub", HUB_ID)
    assert calls[0] == (HUB_ID, "raw", "forget", {})
    assert [(c[1], c[2]) for c in calls] == [(s, n) for s in ("raw", "knowmem", "scal") for n in SCHEMA[s]]
    # doc_id absent from some rows comes back as None from Arrow and is dropped again
    assert data.records("knowmem", "forget_qa_icl") == corpus["knowmem"]["forget_qa_icl"]
    assert data.split("raw", "forget").sha256 == records_sha256(corpus["raw"]["forget"])
    assert "no split 'retain2'" in data.missing["raw/retain2"]
    assert "no config 'scal'" in data.missing["scal/forget_1"]


def test_hub_failure_is_a_data_error_with_the_fix(monkeypatch, online_env):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'muse-bench/MUSE-News' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"muse-bench/MUSE-News.*raw/forget.*local copy"):
        load_data(HUB_ID)


# --------------------------------------------------------------------------- hub-layout directory


@pytest.mark.slow
@pytest.mark.muse_news
def test_hub_layout_written_from_the_muse_copy_loads_back_identically(muse_news_dir, tmp_path, monkeypatch, no_network):
    import datasets

    original = load_data(str(muse_news_dir))
    out = write_hub_layout(original, tmp_path / "hub")
    assert resolve_source(str(out)).kind == "hub_dir"

    # the datasets cache goes to a temporary directory that is removed afterwards
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    reloaded = load_data(str(out))
    assert list(scratch.iterdir()) == []

    assert reloaded.kind == "hub_dir" and reloaded.source == str(out)
    assert set(reloaded.missing) == set(original.missing)
    assert list(reloaded.splits) == list(original.splits)
    for key, split in original.splits.items():
        assert reloaded.splits[key].records == split.records, key
        assert reloaded.splits[key].sha256 == split.sha256, key
        assert reloaded.splits[key].file_sha256 is not None
    # and plain datasets reads it too, offline
    qa = datasets.load_dataset(str(out), "knowmem", split="forget_qa", cache_dir=str(tmp_path / "cache"))
    assert qa.num_rows == 100 and qa[0] == original.records("knowmem", "forget_qa")[0]


def test_hub_layout_round_trip_keeps_partial_doc_ids(fake_world, tmp_path, no_network):
    world = load_data("world")
    out = write_hub_layout(world, tmp_path / "world-hub")
    back = load_data(str(out))
    assert back.missing.keys() == world.missing.keys()
    for key, split in world.splits.items():
        assert back.splits[key].records == split.records, key
        assert back.splits[key].sha256 == split.sha256, key
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert world.split("raw", "forget").sha256 in readme and "privleak/holdout" in readme


def test_write_hub_layout_refuses_a_non_empty_directory_unless_told(fake_world, tmp_path):
    world = load_data("world", subsets=["verbmem"])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty.*overwrite=True"):
        write_hub_layout(world, target)
    assert (target / "keep.txt").exists()
    write_hub_layout(world, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "verbmem"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers


def test_hub_dir_bad_record_names_the_data_file(fake_world, tmp_path):
    out = write_hub_layout(load_data("world", subsets=["knowmem"]), tmp_path / "hub")
    bad = out / "knowmem" / "retain_qa.jsonl"
    bad.write_text('{"question": "q", "reply": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*lacks field 'answer'"):
        load_data(str(out), subsets=["knowmem"])
    bad.write_text('{"question": "q", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*datasets could not read knowmem/retain_qa.*JSON"):
        load_data(str(out), subsets=["knowmem"])


def test_hub_dir_file_listed_but_absent_is_a_missing_split_naming_the_file(fake_world, tmp_path):
    # as in a partial download of a hub repository: README lists files that are not there
    out = write_hub_layout(load_data("world", subsets=["verbmem", "privleak"]), tmp_path / "hub")
    absent = out / "verbmem" / "forget.jsonl"
    absent.unlink()
    data = load_data(str(out), subsets=["verbmem", "privleak"])
    assert data.has("privleak", "forget") and not data.has("verbmem", "forget")
    with pytest.raises(DataError, match=r"verbmem/forget.*" + re.escape(str(absent)) + ".*does not exist"):
        data.split("verbmem", "forget")


def test_muse_data_built_by_hand():
    split = Split.build("privleak", "forget", ["t"], "mine", "test")
    data = MuseData(source="mine", kind="muse_dir", splits={split.key: split})
    assert data.split("privleak", "forget") is split and len(split) == 1
    with pytest.raises(DataError, match="privleak/nope.*not a MUSE split"):
        data.split("privleak", "nope")
