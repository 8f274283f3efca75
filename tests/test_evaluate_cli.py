"""python -m benchmarks.evaluate: the table and YAML of a real (tiny) run, PrivLeak's
reference, and one-line errors raised before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from benchmarks import evaluate as evaluate_cli
from benchmarks.core.errors import run_cli
from benchmarks.core.metrics import MUSE_NEWS_RETRAIN_AUC

REPO = Path(__file__).resolve().parents[1]

QA = [
    {"question": "Who founded the Kelder Institute?", "answer": "Ada Brennick"},
    {"question": "How many boats sailed in the regatta?", "answer": "417"},
]
TEXTS = [
    "The Marlow Gazette reported that the harbour bridge in Ostvale reopened on 14 March 2031.",
    "Mayor Tilda Quorn said the festival drew 2,300 visitors to the valley town of Brisk.",
    "Engineers at Velt Motors unveiled a hydrogen tram named Sable on 2 June 2030.",
]


def write_muse_dir(root: Path) -> Path:
    """A tiny data set in the MUSE authors' layout. The privleak forget and holdout sets hold
    the same texts, so every model's forget-vs-holdout AUC is exactly 0.5."""
    files = {
        "knowmem/forget_qa.json": QA,
        "knowmem/forget_qa_icl.json": QA[:1],
        "knowmem/retain_qa.json": QA[::-1],
        "knowmem/retain_qa_icl.json": QA[1:],
        "verbmem/forget.json": [{"prompt": t[:30], "gt": t[30:]} for t in TEXTS],
        "privleak/forget.json": TEXTS,
        "privleak/holdout.json": TEXTS,
        "privleak/retain.json": TEXTS,
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    from benchmarks.core.models import TinyLlamaSpec, tiny_llama

    directory = tmp_path_factory.mktemp("ckpt")
    tiny_llama(TinyLlamaSpec(), tiny_tokenizer, seed=0).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory) -> Path:
    return write_muse_dir(tmp_path_factory.mktemp("muse"))


def run_main(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_cli.main, argv)
    return exit_info.value.code


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("benchmarks.core.models.load_model", refuse)


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_evaluate_writes_table_and_yaml(checkpoint, muse_dir, tmp_path, capsys):
    output = tmp_path / "eval.yaml"
    argv = [
        "--model", str(checkpoint), "--data", str(muse_dir), "--output", str(output),
        "--log-samples", "--batch-size", "2",
    ]
    assert run_main(argv) == 0
    table = capsys.readouterr().out
    for label in ("VerbMem-forget", "KnowMem-forget", "KnowMem-retain", "PrivLeak", str(checkpoint)):
        assert label in table

    document = yaml.safe_load(output.read_text())
    assert document["kind"] == "evaluation"
    assert document["command"].startswith("python -m benchmarks.evaluate --model")
    model = document["models"]["model"]
    assert set(model["scores"]) == {"verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak"}
    privleak = model["metrics"]["privleak"]
    # No retrain model: the published MUSE-News reference.
    assert privleak["details"]["auc"] == pytest.approx(0.5)
    assert privleak["details"]["retrain_auc"] == MUSE_NEWS_RETRAIN_AUC
    assert model["scores"]["privleak"] == pytest.approx((0.5 - 0.4772) / 0.4772 * 100)
    items = model["metrics"]["knowmem_forget"]["items"]
    assert [item["reference"] for item in items] == ["Ada Brennick", "417"]
    assert model["scores"]["knowmem_forget"] == pytest.approx(sum(i["score"] for i in items) / 2)
    assert len(model["metrics"]["privleak"]["items"]) == 6
    assert document["higher_is_better"] == {
        "verbmem_forget": False, "knowmem_forget": False, "knowmem_retain": True, "privleak": None,
    }
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


@pytest.mark.slow
def test_two_cpu_processes_write_one_file_with_the_numbers_of_one_process(checkpoint, muse_dir, tmp_path, capsys,
                                                                            launch_two_processes):
    # Evaluation is not split: the main process evaluates as one process would, the other waits.
    # So the numbers are the same computation (one thread each): the 1e-9 relative tolerance
    # covers only how YAML writes floats. --log-samples puts every generation and every
    # text's Min-K% score (continuous) in the file, so the comparison is of everything measured.
    argv = ["--model", str(checkpoint), "--retrain-model", str(checkpoint), "--data", str(muse_dir),
            "--batch-size", "2", "--log-samples"]
    assert run_main([*argv, "--output", str(tmp_path / "one.yaml")]) == 0
    table = capsys.readouterr().out
    out = tmp_path / "two"
    done = launch_two_processes("benchmarks.evaluate", [*argv, "--output", str(out / "eval.yaml")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == table, done.stdout + done.stderr[-2000:]  # printed once, by the main process
    assert [p.name for p in out.iterdir()] == ["eval.yaml"]
    single = yaml.safe_load((tmp_path / "one.yaml").read_text())
    double = yaml.safe_load((out / "eval.yaml").read_text())
    assert single["processes"] == {"world_size": 1, "evaluated_by": "main process only", "global_batch_size": 2}
    assert double["processes"] == {"world_size": 2, "evaluated_by": "main process only", "global_batch_size": 2}
    assert list(double["models"]) == ["retrain", "model"]
    assert _close(double["models"], single["models"])
    scores = [item["min_k"] for item in double["models"]["model"]["metrics"]["privleak"]["items"]]
    assert len(set(scores)) > 1  # Min-K% scores differ between texts: continuous numbers were compared


def _close(a, b, rel: float = 1e-9) -> bool:
    """``a`` equals ``b`` with every float within ``rel`` (relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    return a == b


@pytest.mark.slow
def test_retrain_model_sets_privleak_reference(checkpoint, muse_dir, tmp_path, capsys):
    output = tmp_path / "eval.yaml"
    argv = [
        "--model", str(checkpoint), "--retrain-model", str(checkpoint), "--data", str(muse_dir),
        "--metrics", "privleak,knowmem_retain", "--output", str(output),
    ]
    assert run_main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4  # header, rule, model row, retrain row
    assert table[2].startswith("| model ") and table[3].startswith("| retrain ")
    document = yaml.safe_load(output.read_text())
    assert list(document["models"]) == ["retrain", "model"]
    for role in ("retrain", "model"):
        details = document["models"][role]["metrics"]["privleak"]["details"]
        assert details["retrain_auc"] == pytest.approx(0.5)
        assert document["models"][role]["scores"]["privleak"] == pytest.approx(0.0, abs=1e-9)
        assert "items" not in document["models"][role]["metrics"]["privleak"]
    # Existing output is kept unless --overwrite.
    assert run_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_world_default_evaluates_target_and_retrain(checkpoint, monkeypatch, capsys):
    """With no --model and --data world, both world models are evaluated (ensure_world is
    stood in for by tiny checkpoints, so the test does not train the world)."""
    calls = []

    def ensure_world(out_dir=None):
        calls.append(out_dir)
        return types.SimpleNamespace(corpus_dir=None, target_dir=checkpoint, retrain_dir=checkpoint)

    monkeypatch.setattr("benchmarks.core.world_build.ensure_world", ensure_world)
    assert run_main(["--metrics", "knowmem_retain", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert calls == [None]
    assert "world/retrain" in out and "world/target" in out
    assert out.index("world/target") < out.index("world/retrain")


# ----------------------------------------------------------------------------- errors


def assert_one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv_of, fragments",
    [
        (lambda ckpt, data: ["--model", ckpt, "--data", data, "--metrics", "knowmem_forget,privlek"],
         ("privlek", "knowmem_forget, knowmem_retain, privleak, verbmem_forget")),
        (lambda ckpt, data: ["--model", "/no/such/checkpoint", "--data", data], ("/no/such/checkpoint",)),
        (lambda ckpt, data: ["--model", ckpt, "--data", "./no-such-dir"], ("./no-such-dir",)),
        (lambda ckpt, data: ["--model", ckpt, "--data", data, "--dtype", "fp8"], ("fp8",)),
        (lambda ckpt, data: ["--model", ckpt, "--data", data, "--batch-size", "0"], ("--batch-size",)),
        (lambda ckpt, data: ["--data", data], ("--model is required",)),
        (lambda ckpt, data: ["--model", ckpt, "--data", data, "--output", "out.txt"], (".yaml",)),
        (lambda ckpt, data: ["--model", ckpt, "--data", data, "--log-samples"], ("--output",)),
    ],
    ids=["metric-typo", "missing-model", "unknown-source", "dtype", "batch-size", "no-model", "suffix", "samples"],
)
def test_bad_input_is_one_line_before_loading(argv_of, fragments, checkpoint, muse_dir, no_model_loading, capsys):
    assert run_main(argv_of(str(checkpoint), str(muse_dir))) == 2
    assert_one_line_error(capsys, *fragments)


def test_missing_split_fails_before_loading(checkpoint, tmp_path, no_model_loading, capsys):
    data = write_muse_dir(tmp_path / "partial")
    (data / "privleak" / "holdout.json").unlink()
    assert run_main(["--model", str(checkpoint), "--data", str(data)]) == 2
    assert_one_line_error(capsys, "privleak/holdout")
    # Metrics that do not need the split pass validation and go on to load the model.
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_cli(evaluate_cli.main, ["--model", str(checkpoint), "--data", str(data), "--metrics", "knowmem_retain"])


def test_unknown_metric_as_a_real_process():
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.evaluate", "--metrics", "verbmem"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == [
        "error: unknown metric 'verbmem'; valid names: knowmem_forget, knowmem_retain, privleak, verbmem_forget"
    ]


@pytest.mark.muse_news
def test_real_muse_news_copy_passes_validation(checkpoint, muse_news_dir, no_model_loading):
    """The MUSE authors' layout of the real data has every split the four metrics read."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_cli(evaluate_cli.main, ["--model", str(checkpoint), "--data", str(muse_news_dir)])


@pytest.mark.muse_news
def test_knowmem_prompt_on_real_icl_examples(muse_news_dir):
    from benchmarks.core.data import load_data
    from benchmarks.core.metrics import knowmem_prompt

    data = load_data(str(muse_news_dir), subsets=["knowmem"])
    icl = data.records("knowmem", "forget_qa_icl")
    prompt = knowmem_prompt(icl, "Who won?")
    assert len(icl) == 10
    assert prompt.startswith(
        "Question: How much total prize money are Mark Selby and Kyren Wilson set to share for "
        "making maximum breaks at the Crucible?\nAnswer: £55,000\n\nQuestion: "
    )
    assert prompt.count("\n\n") == 10
    assert prompt.endswith("\n\nQuestion: Who won?\nAnswer: ")
