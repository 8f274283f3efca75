"""Model provenance: hub commits from the local cache layout, local digests computed once,
owner-less hub ids accepted."""

from __future__ import annotations

import os

import pytest

from benchmarks.core.errors import UsageError
from benchmarks.core.models import check_model_ref
from benchmarks.core.provenance import cached_commit, model_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo_id):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_hub_commit_from_the_local_snapshot_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = _fake_cache(tmp_path, "OPTML-Group/NPO-SAM-MUSE-NEWS")
    assert cached_commit("OPTML-Group/NPO-SAM-MUSE-NEWS", cache_dir=cache) == COMMIT
    assert cached_commit("OPTML-Group/other", cache_dir=cache) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert model_fingerprint("OPTML-Group/NPO-SAM-MUSE-NEWS") == f"hub:OPTML-Group/NPO-SAM-MUSE-NEWS@{COMMIT}"
    assert model_fingerprint("gpt2") == "hub:gpt2@unknown"


def test_a_local_checkpoint_is_hashed_once_until_its_files_change(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    first = model_fingerprint(str(ckpt))
    assert first.startswith("sha256:")
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)  # same size; the stored time is put back: the cached digest answers
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(str(ckpt)) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert model_fingerprint(str(ckpt)) != first


@pytest.mark.parametrize("ref", ["gpt2", "meta-llama/Llama-3.2-1B-Instruct", "EleutherAI/pythia-70m"])
def test_valid_hub_ids_are_accepted(ref):
    assert check_model_ref(ref) == ref


@pytest.mark.parametrize("ref", ["a/b/c", "./missing", "bad--name", "owner/na..me", "x" * 97])
def test_invalid_hub_ids_are_refused(ref):
    with pytest.raises(UsageError, match="neither an existing directory nor a hub id"):
        check_model_ref(ref)
