"""A built world's directory as a data source (``--data <world root>``) for relearn, evaluate and
unlearn, and PrivLeak on it measured against the world's own retrain model, never MUSE-News'
published AUC.

The world here is a stand-in with the layout ``benchmarks.world`` writes (``world.json``,
``corpus/`` in hub layout, ``target/``, ``retrain/``) and tiny models, so nothing is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import evaluate, relearn, unlearn
from benchmarks.core.unlearning import preset_settings
from defenses import DEFENSES
from benchmarks.core.data import load_data, resolve_source, world_root_models, write_hub_layout
from benchmarks.core.errors import run_cli
from benchmarks.core.metrics import MUSE_NEWS_RETRAIN_AUC, privleak
from benchmarks.core.models import TinyLlamaSpec, load_model, tiny_llama
from benchmarks.core.results import read_result

ARTICLES = [
    ("w0", "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031."),
    ("w1", "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk."),
    ("w2", "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030."),
    ("w3", "The Kelder Institute was founded by Ada Brennick, the Gazette reported."),
]
HOLDOUT = [
    "A ferry named Orrin began service across the Tamsel lake.",
    "Farmers in Pellow reported the wettest spring in forty years.",
    "The Brisk choir won the regional prize for the third time.",
    "Ostvale opened a library in the old customs house.",
]


@pytest.fixture(scope="module")
def world_root(tmp_path_factory, tiny_tokenizer) -> Path:
    scratch = tmp_path_factory.mktemp("muse")
    files = {
        "raw/forget.json": [{"text": t, "doc_id": d} for d, t in ARTICLES],
        "raw/retain1.json": [{"text": t} for t in HOLDOUT[:2]],
        "raw/retain2.json": [{"text": t} for t in HOLDOUT[2:]],
        "raw/holdout.json": [{"text": t} for t in HOLDOUT],
        "knowmem/forget_qa.json": [{"question": f"What happened in article {d}?", "answer": t.split()[-1], "doc_id": d}
                                   for d, t in ARTICLES],
        "knowmem/forget_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "knowmem/retain_qa.json": [{"question": "What did Velt Motors unveil?", "answer": "a tram"}],
        "knowmem/retain_qa_icl.json": [{"question": "Who is the mayor?", "answer": "Tilda Quorn"}],
        "verbmem/forget.json": [{"prompt": t[:25], "gt": t[25:], "doc_id": d} for d, t in ARTICLES],
        "privleak/forget.json": [{"text": t, "doc_id": d} for d, t in ARTICLES],
        "privleak/retain.json": [{"text": t} for t in HOLDOUT],
        "privleak/holdout.json": [{"text": t} for t in HOLDOUT],
    }
    for name, records in files.items():
        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records), encoding="utf-8")
    root = tmp_path_factory.mktemp("worlds") / "world-test"
    write_hub_layout(load_data(str(scratch)), root / "corpus")
    for name, seed in (("target", 0), ("retrain", 1)):
        tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=seed).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    (root / "world.json").write_text(json.dumps({"hash": "test"}), encoding="utf-8")
    return root


def _auc(checkpoint: Path, data) -> float:
    model, tokenizer = load_model(str(checkpoint))
    return privleak(model, tokenizer, data.records("privleak", "forget"), data.records("privleak", "holdout"),
                    as_retrain=True).details["auc"]


@pytest.fixture(scope="module")
def retrain_auc(world_root) -> float:
    auc = _auc(world_root / "retrain", load_data(str(world_root)))
    # The check below would pass by accident if the world's AUC were MUSE-News' value.
    assert 0 < auc <= 1 and abs(auc - MUSE_NEWS_RETRAIN_AUC) > 1e-3
    return auc


def test_a_world_root_loads_its_corpus(world_root):
    assert resolve_source(str(world_root)).kind == "world_dir"
    models = world_root_models(str(world_root))
    assert (models.target, models.retrain) == (world_root.resolve() / "target", world_root.resolve() / "retrain")
    from_root, from_corpus = load_data(str(world_root)), load_data(str(world_root / "corpus"))
    assert from_root.kind == "world_dir"
    assert {k: s.sha256 for k, s in from_root.splits.items()} == {k: s.sha256 for k, s in from_corpus.splits.items()}
    assert world_root_models(str(world_root / "corpus")) is None and world_root_models("world") is None


def test_relearn_dry_run_on_a_world_root_uses_its_models_and_the_world_preset(world_root, tmp_path, capsys):
    assert relearn.main(["--data", str(world_root), "--defense", "npo", "--dry-run",
                         "--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    plan = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("dry run", "note:"))))
    root = world_root.resolve()
    assert plan["data"]["preset"] == "world"
    assert plan["curves"]["target"]["checkpoint"] == str(root / "target")
    assert plan["curves"]["retrain"]["checkpoint"] == str(root / "retrain")
    assert plan["curves"]["npo"]["unlearned_from"] == str(root / "target")
    assert plan["curves"]["npo"]["defense_hyperparameters"] == preset_settings("npo", "world", DEFENSES)
    assert plan["attack"]["hyperparameters"]["steps"] == relearn.WORLD_PRESET["attack"]["steps"]


@pytest.mark.slow
def test_relearn_privleak_on_a_world_root_uses_its_retrain_model(world_root, retrain_auc, tmp_path):
    # No baselines attacked, so no retrain curve: the reference must still be the world's retrain.
    out = tmp_path / "out"
    argv = ["--data", str(world_root), "--model", str(world_root / "target"), "--defense", "none",
            "--label", "mine", "--no-baselines", "--privleak", "--steps", "2", "--milestones", "1",
            "--batch-size", "2", "--micro-batch-size", "1", "--max-length", "32", "--relearn-docs", "2",
            "--seeds", "0", "--eval-batch-size", "4", "--output-dir", str(out), "--state-dir",
            str(tmp_path / "state"), "--no-progress"]
    assert relearn.main(argv) == 0
    (path,) = out.glob("*.yaml")
    result = read_result(path)
    reference = result["evaluation"]["privleak_reference"]
    assert reference["auc"] == pytest.approx(retrain_auc)
    assert str(world_root.resolve() / "retrain") in reference["source"]
    target_auc = _auc(world_root / "target", load_data(str(world_root)))
    step0 = result["curves"]["mine"]["metrics"]["privleak"]["per_seed"][0][0]
    assert step0 == pytest.approx((target_auc - retrain_auc) / retrain_auc * 100, abs=1e-6)
    # VerbMem items of the world carry their article: T and V curves exist.
    assert {"verbmem_forget_heldout", "verbmem_forget_relearn"} <= set(result["curves"]["mine"]["metrics"])


def test_evaluate_on_a_world_root_takes_privleak_reference_from_its_retrain(world_root, retrain_auc, tmp_path,
                                                                            capsys):
    output = tmp_path / "eval.yaml"
    argv = ["--data", str(world_root), "--model", str(world_root / "target"), "--metrics", "privleak",
            "--output", str(output)]
    with pytest.raises(SystemExit) as done:
        run_cli(evaluate.main, argv)
    assert done.value.code == 0, capsys.readouterr().err
    document = yaml.safe_load(output.read_text())
    assert list(document["models"]) == ["retrain", "model"]
    details = document["models"]["model"]["metrics"]["privleak"]["details"]
    assert details["retrain_auc"] == pytest.approx(retrain_auc)
    assert details["retrain_auc_source"] == "retrain model"
    # Without --model the world's own target is evaluated.
    plan = evaluate.plan_models(evaluate.build_parser().parse_args(["--data", str(world_root)]))
    assert [(m.role, m.ref) for m in plan] == [("retrain", str(world_root.resolve() / "retrain")),
                                               ("target", str(world_root.resolve() / "target"))]


def test_unlearn_on_a_world_root_unlearns_its_target_with_the_world_preset(world_root, tmp_path):
    args = unlearn.build_parser().parse_args(["--defense", "npo", "--data", str(world_root),
                                              "--out", str(tmp_path / "ckpt")])
    request = unlearn.plan_request(args)
    root = world_root.resolve()
    assert (request.model_ref, request.retrain_ref, request.preset) == (str(root / "target"), str(root / "retrain"),
                                                                        "world")
    assert request.config.lr == preset_settings("npo", "world", DEFENSES)["lr"]
