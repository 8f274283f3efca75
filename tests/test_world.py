"""The embedded world: corpus generator (fast) and the build of corpus + models (slow, tiny)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from benchmarks.core.errors import UsageError
from benchmarks.core.models import TinyLlamaSpec
from benchmarks.core.world_corpus import RAW_SPLITS, WorldConfig, build_corpus, config_hash
from benchmarks.core.tokenizer import encode_cut_after
from benchmarks.core.world_build import (
    MANIFEST,
    WorldBuildConfig,
    ensure_world,
    training_stream,
    world_hash,
)
from benchmarks.world import main


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(WorldConfig())


def _rouge_tokens(text: str) -> set[str]:
    # rouge-score's tokenizer: lowercase, non-alphanumerics become spaces.
    return set(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _contains_word(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(phrase)}(?![A-Za-z0-9])", text) is not None


def _articles(corpus, split):
    return {r["doc_id"]: r["text"] for r in corpus["raw"][split]}


# --------------------------------------------------------------------------- corpus


def test_same_seed_same_corpus_other_seed_other_corpus(corpus):
    assert build_corpus(WorldConfig()) == corpus
    other = build_corpus(WorldConfig(seed=1))
    assert other["raw"]["forget"][0]["text"] != corpus["raw"]["forget"][0]["text"]
    assert {r["answer"] for r in other["knowmem"]["forget_qa"]} != {r["answer"] for r in corpus["knowmem"]["forget_qa"]}


def test_schema_is_complete(corpus):
    from benchmarks.core.data import REQUIRED_SUBSETS, SCHEMA

    assert set(corpus) == set(REQUIRED_SUBSETS)
    for subset, splits in corpus.items():
        assert set(splits) == set(SCHEMA[subset]), subset
        for split, records in splits.items():
            assert records, f"{subset}/{split} is empty"
            for record in records:
                assert set(record) == set(SCHEMA[subset][split]) | {"doc_id"}, f"{subset}/{split}"
                assert all(isinstance(v, str) and v for v in record.values())


def test_split_sizes_follow_the_config():
    config = WorldConfig(num_forget=7, num_retain1=3, num_retain2=5, num_holdout=4, facts_per_article=2, num_icl=3)
    corpus = build_corpus(config)
    assert [len(corpus["raw"][s]) for s in RAW_SPLITS] == [7, 3, 5, 4]
    assert len(corpus["verbmem"]["forget"]) == 7
    assert len(corpus["knowmem"]["forget_qa"]) == 7 * 2 - 3
    assert len(corpus["knowmem"]["forget_qa_icl"]) == 3
    assert len(corpus["knowmem"]["retain_qa"]) == 5 * 2 - 3
    assert [len(corpus["privleak"][s]) for s in ("forget", "retain", "holdout")] == [7, 5, 4]


def test_doc_ids_name_articles_of_the_right_split(corpus):
    forget, retain2, holdout = (_articles(corpus, s) for s in ("forget", "retain2", "holdout"))
    all_ids = [r["doc_id"] for s in RAW_SPLITS for r in corpus["raw"][s]]
    assert len(all_ids) == len(set(all_ids))
    for split in ("forget_qa", "forget_qa_icl"):
        assert all(r["doc_id"] in forget for r in corpus["knowmem"][split])
    for split in ("retain_qa", "retain_qa_icl"):
        assert all(r["doc_id"] in retain2 for r in corpus["knowmem"][split])
    assert [r["doc_id"] for r in corpus["verbmem"]["forget"]] == list(forget)
    for split, source in (("forget", forget), ("retain", retain2), ("holdout", holdout)):
        assert all(source[r["doc_id"]] == r["text"] for r in corpus["privleak"][split])


def test_question_and_answer_occur_in_their_article(corpus):
    for qa_split, raw_split in (("forget_qa", "forget"), ("forget_qa_icl", "forget"), ("retain_qa", "retain2"), ("retain_qa_icl", "retain2")):
        articles = _articles(corpus, raw_split)
        for r in corpus["knowmem"][qa_split]:
            text = articles[r["doc_id"]]
            assert f"Question: {r['question']}\nAnswer: {r['answer']}" in text
            # ... and in the prose too, not only in the Question/Answer blocks.
            prose = text.split("\n\nQuestion: ")[0]
            assert _contains_word(prose, r["answer"]), (r, prose)


def test_every_forget_article_is_asked_about(corpus):
    asked = [r["doc_id"] for r in corpus["knowmem"]["forget_qa"]]
    assert all(asked.count(doc_id) >= 2 for doc_id in _articles(corpus, "forget"))


def test_icl_examples_are_not_asked_again(corpus):
    for qa, icl in (("forget_qa", "forget_qa_icl"), ("retain_qa", "retain_qa_icl")):
        asked = {r["question"] for r in corpus["knowmem"][qa]}
        assert not asked & {r["question"] for r in corpus["knowmem"][icl]}
    assert len({r["doc_id"] for r in corpus["knowmem"]["forget_qa_icl"]}) == WorldConfig().num_icl


def test_forget_answers_never_occur_in_retain_articles(corpus):
    retain_texts = [r["text"] for s in ("retain1", "retain2") for r in corpus["raw"][s]]
    for r in corpus["knowmem"]["forget_qa"] + corpus["knowmem"]["forget_qa_icl"]:
        assert not any(_contains_word(t, r["answer"]) for t in retain_texts), r["answer"]


def test_forget_and_retain_answers_share_no_rouge_token(corpus):
    # A model that knows only retain facts can guess only retain-style answers: disjoint
    # ROUGE tokens mean such guesses score exactly 0 on forget questions.
    forget = set().union(*(_rouge_tokens(r["answer"]) for r in corpus["knowmem"]["forget_qa"]))
    retain_text = " ".join(r["text"] for s in ("retain1", "retain2") for r in corpus["raw"][s])
    assert not forget & _rouge_tokens(retain_text)
    retain = set().union(*(_rouge_tokens(r["answer"]) for r in corpus["knowmem"]["retain_qa"]))
    assert not forget & retain


def test_verbmem_prompt_and_gt_make_the_article(corpus):
    articles = _articles(corpus, "forget")
    for r in corpus["verbmem"]["forget"]:
        assert r["prompt"] + r["gt"] == articles[r["doc_id"]]
        assert len(r["prompt"].split()) == WorldConfig().verbmem_prompt_words
        assert r["gt"][0].isspace()


def test_largest_allowed_world_keeps_every_value_unique():
    corpus = build_corpus(WorldConfig(num_forget=150, num_retain1=50, num_retain2=50, num_holdout=50, facts_per_article=6))
    answers = [r["answer"] for split in ("forget_qa", "retain_qa") for r in corpus["knowmem"][split]]
    numbers = [a for a in answers if a.isdigit()]
    assert len(numbers) == len(set(numbers)) > 300


def test_load_data_accepts_the_world_corpus():
    from benchmarks.core.data import load_data

    data = load_data("world", world_config=WorldConfig(num_forget=3, num_retain1=1, num_retain2=2, num_holdout=1, num_icl=1))
    assert len(data.records("raw", "forget")) == 3


def _topic_of_title(title: str) -> str:
    """The topic whose title template matches ``title`` (templates turned into regexes here,
    independently of the generator's own bookkeeping)."""
    from benchmarks.core.world_corpus import TOPICS

    matches = [
        topic.name for topic in TOPICS for template in topic.title
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), title, flags=re.IGNORECASE)
    ]
    assert len(set(matches)) == 1, (title, matches)
    return matches[0]


def test_forget_and_holdout_are_one_subject_and_retain_the_rest(corpus):
    topics = {split: {_topic_of_title(r["text"].split("\n", 1)[0]) for r in corpus["raw"][split]}
              for split in RAW_SPLITS}
    forget_topics = set(WorldConfig().forget_topics)
    assert topics["forget"] == topics["holdout"] == forget_topics
    assert topics["retain1"] == topics["retain2"] and not topics["retain1"] & forget_topics
    assert len(topics["retain1"]) == 6 - len(forget_topics)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_in_context_example_holds_an_evaluated_answer(seed):
    """Every (in-context example, evaluated question) pair of both KnowMem splits: the answer
    occurs nowhere in the example's question or answer, in any case."""
    knowmem = build_corpus(WorldConfig(seed=seed))["knowmem"]
    for evaluated, examples in (("forget_qa", "forget_qa_icl"), ("retain_qa", "retain_qa_icl")):
        for example in knowmem[examples]:
            shown = f"{example['question']} {example['answer']}".lower()
            for item in knowmem[evaluated]:
                assert item["answer"].lower() not in shown, (example, item)


def test_retain_questions_make_a_fine_utility_bar(corpus):
    # >= 100 questions: 0.9 x KnowMem-retain moves in steps of at most one point.
    assert len(corpus["knowmem"]["retain_qa"]) >= 100


@pytest.mark.parametrize("topics", [(), ("bridge", "bridge"), ("sport",),
                                    ("bridge", "final", "discovery", "takeover", "election", "festival")])
def test_world_config_rejects_bad_forget_topics(topics):
    with pytest.raises(UsageError, match="forget_topics"):
        WorldConfig(forget_topics=topics)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_forget": 0},
        {"num_holdout": -1},
        {"facts_per_article": 0},
        {"facts_per_article": 7},
        {"num_icl": -1},
        {"num_forget": 2, "facts_per_article": 2, "num_icl": 4},
        {"verbmem_prompt_words": 0},
        {"num_forget": 200, "num_retain1": 98},
    ],
)
def test_world_config_rejects_bad_values(kwargs):
    with pytest.raises(UsageError):
        WorldConfig(**kwargs)


def test_config_hash_tracks_every_field():
    assert config_hash(WorldConfig()) == config_hash(WorldConfig())
    assert config_hash(WorldConfig(seed=1)) != config_hash(WorldConfig())
    assert config_hash(WorldConfig(num_icl=5)) != config_hash(WorldConfig())
    build = WorldBuildConfig()
    assert world_hash(build) == world_hash(WorldBuildConfig())
    assert world_hash(WorldBuildConfig(epochs=build.epochs + 1)) != world_hash(build)
    assert world_hash(WorldBuildConfig(corpus=WorldConfig(seed=3))) != world_hash(build)


# --------------------------------------------------------------------------- training text


def test_cut_tokenization_matches_the_knowmem_prompt():
    from benchmarks.core.tokenizer import train_tokenizer

    text = "Question: Who founded the Kelder Institute?\nAnswer: Ada Brennick\n\n"
    tokenizer = train_tokenizer([text] * 20, vocab_size=300)
    ids = encode_cut_after(tokenizer, text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer("Question: Who founded the Kelder Institute?\nAnswer: ")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "\u0120"  # the lone space
    assert ids[: len(prompt)] == prompt
    assert ids[len(prompt) :] == tokenizer("Ada Brennick\n\n", add_special_tokens=False)["input_ids"]
    # Tokenized whole, the same text glues the space to the answer instead.
    whole = tokenizer(text)["input_ids"]
    glued = tokenizer.convert_ids_to_tokens(whole[len(prompt) - 1])
    assert glued.startswith("\u0120A"), glued
    assert whole != ids


def test_training_stream_repacks_questions_every_epoch(tiny_tokenizer):
    corpus = build_corpus(WorldConfig(num_forget=3, num_retain1=1, num_retain2=1, num_holdout=1, num_icl=1))
    texts = [r["text"] for r in corpus["raw"]["forget"]]
    blocks = sorted(b for t in texts for b in t.split("\n\n") if b.startswith("Question: "))
    stream = training_stream(texts, tiny_tokenizer, qa_pack_size=4, epochs=3, seed=0, qa_repeats=2)
    per_epoch = 3 + 2 * 3  # 3 articles; 9 blocks in packs of 4, twice
    assert len(stream) == 3 * per_epoch
    eos, bos = tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id
    assert all(s[0] == bos and s[-1] == eos for s in stream)
    packings = []
    for epoch in range(3):
        decoded = [tiny_tokenizer.decode(s, skip_special_tokens=True) for s in stream[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sorted(d for d in decoded if d in texts) == sorted(texts)  # every article, whole
        packs = [d for d in decoded if d not in texts]
        assert sorted(b for p in packs for b in p.split("\n\n") if b) == sorted(blocks * 2)
        packings.append(sorted(packs))
    assert packings[0] != packings[1] != packings[2]  # new neighbours every epoch
    assert training_stream(texts, tiny_tokenizer, 4, epochs=3, seed=0, qa_repeats=2) == stream
    assert training_stream(texts, tiny_tokenizer, 4, epochs=3, seed=1, qa_repeats=2) != stream


# --------------------------------------------------------------------------- build


def _small_build(**overrides) -> WorldBuildConfig:
    return WorldBuildConfig(
        corpus=WorldConfig(num_forget=3, num_retain1=2, num_retain2=2, num_holdout=2, facts_per_article=2, num_icl=1),
        model=TinyLlamaSpec(),  # 2 layers, 64 wide
        vocab_size=400,
        epochs=2,
        batch_size=4,
        warmup_steps=1,
        **overrides,
    )


@pytest.mark.slow
def test_build_saves_loadable_models_and_reuses_the_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import benchmarks.core.world_build as world
    from benchmarks.core.data import load_data

    monkeypatch.setenv("RELEARN_BENCH_CACHE", str(tmp_path / "cache"))
    config = _small_build()
    paths = ensure_world(config=config)
    assert paths.root == tmp_path / "cache" / f"world-{world_hash(config)}"
    manifest = json.loads((paths.root / MANIFEST).read_text())
    assert manifest["hash"] == world_hash(config)
    assert [p.name for p in paths.root.parent.iterdir()] == [paths.root.name]  # no leftovers

    for directory in (paths.target_dir, paths.retrain_dir):
        assert (directory / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size
        ids = tokenizer("Question: Who?\nAnswer: ", return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id
        assert torch.isfinite(model(ids).logits).all()

    # The corpus directory is the generated corpus, in hub layout.
    written = load_data(str(paths.corpus_dir))
    generated = load_data("world", world_config=config.corpus)
    assert {s.key: s.sha256 for s in written} == {s.key: s.sha256 for s in generated}

    # A second call finds the world and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(world, "train_world_model", no_training)
    assert ensure_world(config=config) == paths
    with pytest.raises(AssertionError, match="rebuilt"):
        ensure_world(config=config, force=True)
    assert (paths.root / MANIFEST).is_file()  # a failed rebuild keeps the old world


@pytest.mark.slow
def test_rebuild_gives_identical_weights_and_refuses_foreign_dirs(tmp_path):
    from safetensors.torch import load_file

    config = _small_build()
    first = ensure_world(tmp_path / "a", config=config)
    second = ensure_world(tmp_path / "b", config=config)
    for name in ("target_dir", "retrain_dir"):
        a = load_file(getattr(first, name) / "model.safetensors")
        b = load_file(getattr(second, name) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    target = load_file(first.target_dir / "model.safetensors")
    retrain = load_file(first.retrain_dir / "model.safetensors")
    assert not all(torch.equal(target[k], retrain[k]) for k in target)

    with pytest.raises(UsageError, match="another configuration"):
        ensure_world(tmp_path / "a", config=_small_build(seed=1))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(UsageError, match="not a world"):
            ensure_world(tmp_path / "c", force=force, config=config)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_cli_rejects_bad_threads_before_building(tmp_path):
    with pytest.raises(UsageError, match="threads"):
        main(["--out", str(tmp_path / "w"), "--threads", "0"])
    assert not (tmp_path / "w").exists()


def test_world_build_config_rejects_bad_values():
    with pytest.raises(UsageError):
        WorldBuildConfig(epochs=0)
    with pytest.raises(UsageError):
        WorldBuildConfig(vocab_size=100)
    with pytest.raises(UsageError):
        WorldBuildConfig(corpus={"seed": 1})
