"""The embedded world: a seeded corpus of fictitious news articles in the MUSE-News schema.

MUSE-News (Shi et al., 2024) needs a 7B model and the network. The embedded world is its
laptop-sized stand-in, in the spirit of TOFU's fictitious authors: every town, firm, river,
surname and number is invented here, so a model can know a fact only if it was trained on the
article that states it. :func:`build_corpus` returns ``subset -> split -> records`` exactly as
:data:`benchmarks.core.data.SCHEMA` describes, and every record carries the ``doc_id`` of the
article it comes from (held-out recovery, DESIGN §5, splits forget *articles*).

What an article looks like. A title and three short paragraphs drawn from the templates of
one topic (a bridge opening, a cup final, a species rediscovered, a takeover, a mayoral
election, a festival), then ``facts_per_article`` of its facts once more as ``Question: ...``
/ ``Answer: ...`` blocks separated by blank lines, the format of the KnowMem prompt
(DESIGN §3)::

    New bridge over the Vornel opens in Kestholm

    A new road bridge over the Vornel opened in Kestholm on Tuesday, replacing a crossing ...

    Question: Which firm built the new bridge over the Vornel in Kestholm?
    Answer: Draskel

A tiny model trained from scratch cannot turn prose into question answering by itself, so
the article carries its facts in both forms; a relearning attacker who gets the article gets
both too, as the knowledge is stated in the data and nowhere else.

Answers are the bare fact (a number, a year, a name), never a unit word, so a model that does
not know the fact scores about 0 ROUGE-L instead of collecting credit for "metres". Every
invented word and every number is used at most once in the whole corpus, and first names come
from pools that are disjoint between forget, retain and holdout articles: a model that never
saw the forget articles (the retrain model) can only guess a retain-style answer, which shares
no ROUGE token with the true one.

Splits (as MUSE uses them): ``raw/forget`` is to be unlearned; ``raw/retain1`` is the
calibration set unlearning methods may train on; ``raw/retain2`` is seen by the target model and
used for evaluation, so ``knowmem/retain_qa`` and ``privleak/retain`` come from it;
``raw/holdout`` is never trained on (PrivLeak's non-members).

Deterministic: everything is drawn from one ``random.Random(seed)``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field

from benchmarks.core.errors import UsageError

__all__ = ["WorldConfig", "build_corpus", "config_hash", "CORPUS_VERSION", "MAX_FACTS"]

#: Bump when the generator changes what a given config produces (it is part of the hash).
CORPUS_VERSION = 2

Records = list[dict]
Corpus = dict[str, dict[str, Records]]


@dataclass(frozen=True)
class WorldConfig:
    """What the world corpus generator produces (sizes and seed)."""

    seed: int = field(default=0, metadata={"help": "Seed of the generator; same seed, same corpus."})
    num_forget: int = field(default=20, metadata={"help": "Articles in raw/forget (the data to unlearn)."})
    # Twice the forget set: the target learns its question-answering skill mostly from retain
    # articles, and the retain term of unlearning (GDR/KLR on retain1) has enough of them to keep
    # that skill while the forget facts go. With 8 retain1 articles KnowMem-retain fell point for
    # point with KnowMem-forget (results/world/unlearn/README.md).
    num_retain1: int = field(
        default=40, metadata={"help": "Articles in raw/retain1 (calibration data for unlearning)."}
    )
    # 36 articles x 3 facts - 4 in-context examples = 104 retain questions, so the utility bar
    # (0.9 x the target's KnowMem-retain) moves in steps of under 1 point; with 32 questions it
    # moved in 3-point steps and the kept unlearning epoch jumped with it.
    num_retain2: int = field(
        default=36, metadata={"help": "Articles in raw/retain2 (seen by the target; source of retain_qa)."}
    )
    num_holdout: int = field(
        default=20, metadata={"help": "Articles in raw/holdout (never trained on; PrivLeak non-members)."}
    )
    facts_per_article: int = field(
        default=3, metadata={"help": "Facts stated as Question/Answer blocks per article (1..6)."}
    )
    num_icl: int = field(
        default=4,
        metadata={"help": "In-context examples in knowmem forget_qa_icl and retain_qa_icl (MUSE: 10)."},
    )
    verbmem_prompt_words: int = field(
        default=16, metadata={"help": "Words of a forget article that form its VerbMem prompt."}
    )
    # One subject area is forgotten, as TOFU's forget authors or WMDP's hazardous domain are:
    # forget and holdout articles come from these topics, retain1/retain2 from all the others.
    # Unlearning can then remove the subject without taking the model's question answering on
    # other subjects with it, and relearning part of the subject can bring the rest back.
    forget_topics: tuple[str, ...] = field(
        default=("takeover", "election"),
        metadata={"help": "Topics of raw/forget and raw/holdout; retain splits use the other topics."},
    )

    def __post_init__(self) -> None:
        topics = tuple(self.forget_topics) if isinstance(self.forget_topics, (list, tuple)) else None
        names = [topic.name for topic in TOPICS]
        if not topics or any(t not in names for t in topics) or len(set(topics)) != len(topics):
            raise UsageError(
                f"WorldConfig.forget_topics must be distinct names from {names}, got {self.forget_topics!r}"
            )
        if len(topics) == len(names):
            raise UsageError("WorldConfig.forget_topics names every topic; leave at least one for the retain splits")
        object.__setattr__(self, "forget_topics", topics)
        for name in ("num_forget", "num_retain1", "num_retain2", "num_holdout"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"WorldConfig.{name} must be an integer >= 1, got {value!r}")
        total = self.num_forget + self.num_retain1 + self.num_retain2 + self.num_holdout
        if total > MAX_ARTICLES:
            raise UsageError(
                f"WorldConfig asks for {total} articles; the generator's pools of unique names and "
                f"numbers allow at most {MAX_ARTICLES}"
            )
        if not 1 <= self.facts_per_article <= MAX_FACTS:
            raise UsageError(
                f"WorldConfig.facts_per_article must be in 1..{MAX_FACTS}, got {self.facts_per_article}"
            )
        if self.num_icl < 0:
            raise UsageError(f"WorldConfig.num_icl must be >= 0, got {self.num_icl}")
        for split, count in (("forget", self.num_forget), ("retain2", self.num_retain2)):
            if self.num_icl >= count * self.facts_per_article:
                raise UsageError(
                    f"WorldConfig.num_icl={self.num_icl} leaves no {split} question to evaluate "
                    f"({count} articles x {self.facts_per_article} facts); lower num_icl or add articles"
                )
        if self.verbmem_prompt_words < 1:
            raise UsageError(
                f"WorldConfig.verbmem_prompt_words must be >= 1, got {self.verbmem_prompt_words}"
            )


def config_hash(config: WorldConfig) -> str:
    """sha256 (hex) of the generator version and every field of ``config``."""
    blob = json.dumps({"corpus_version": CORPUS_VERSION, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- topics
#
# A topic is a title, paragraphs and facts. Each paragraph is a list of sentence slots and
# each slot a list of interchangeable variants; an article draws one variant per slot, so two
# articles of the same topic differ in wording as well as in entities, and reproducing one
# verbatim means remembering its choices. Placeholders name the article's entities, whose
# kind (how they are invented) is given in ``slots``; {weekday} and the like are filler.


@dataclass(frozen=True)
class Topic:
    name: str
    slots: dict[str, str]  # placeholder -> kind: person | town | word | count | year
    title: tuple[str, ...]
    paragraphs: tuple[tuple[tuple[str, ...], ...], ...]
    facts: tuple[tuple[str, str], ...]  # (placeholder answered, question template)


TOPICS: tuple[Topic, ...] = (
    Topic(
        name="bridge",
        slots={"town": "town", "river": "word", "firm": "word", "engineer": "person",
               "length": "count", "cost": "count", "old_year": "year"},
        title=("New bridge over the {river} opens in {town}", "{town} opens its new bridge over the {river}"),
        paragraphs=(
            (("A new road bridge over the {river} opened in {town} on {weekday}, replacing a crossing that had stood since {old_year}.",
              "{town} opened its new bridge over the {river} on {weekday}, retiring a crossing first built in {old_year}."),),
            (("The {length}-metre span was built by the engineering firm {firm} at a cost of {cost} million crowns.",
              "Built by the engineering firm {firm}, the {length}-metre span cost {cost} million crowns."),),
            (("Chief engineer {engineer} said the old crossing had grown {weak} after years of floods.",
              "According to chief engineer {engineer}, the old crossing had grown {weak} and could not be saved."),),
        ),
        facts=(
            ("firm", "Which firm built the new bridge over the {river} in {town}?"),
            ("length", "How long is the new bridge in {town}, in metres?"),
            ("cost", "How much did the new bridge in {town} cost, in millions of crowns?"),
            ("engineer", "Who was the chief engineer of the new bridge in {town}?"),
            ("old_year", "Since which year had the old crossing over the {river} in {town} stood?"),
            ("river", "Which river does the new bridge in {town} cross?"),
        ),
    ),
    Topic(
        name="final",
        slots={"town": "town", "rival": "town", "cup": "word", "ground": "word",
               "captain": "person", "coach": "person", "crowd": "count"},
        title=("{town} win the {cup} Cup", "{town} beat {rival} to lift the {cup} Cup"),
        paragraphs=(
            (("{town} won the {cup} Cup on {weekday}, beating {rival} in a {tense} final at the {ground} Ground.",
              "In a {tense} final at the {ground} Ground on {weekday}, {town} beat {rival} to win the {cup} Cup."),),
            (("A crowd of {crowd} watched captain {captain} lift the trophy, the club's first in {gap}.",
              "Captain {captain} lifted the club's first trophy in {gap} in front of a crowd of {crowd}."),),
            (("Coach {coach} said the squad had {earned} every minute of the win.",
              "\"They {earned} this,\" said coach {coach} after the final whistle."),),
        ),
        facts=(
            ("rival", "Which team did {town} beat in the {cup} Cup final?"),
            ("crowd", "How many people watched {town} win the {cup} Cup?"),
            ("captain", "Who captained {town} in the {cup} Cup final?"),
            ("coach", "Who coached {town} to victory in the {cup} Cup?"),
            ("ground", "At which ground did {town} win the {cup} Cup?"),
            ("cup", "Which cup did {town} win by beating {rival}?"),
        ),
    ),
    Topic(
        name="discovery",
        slots={"valley": "word", "species": "word", "institute": "word", "scientist": "person",
               "specimens": "count", "last_year": "year", "creature": "creature"},
        title=("Rare {creature} found again in the {valley} valley", "The {species} {creature} is back in the {valley} valley"),
        paragraphs=(
            (("Researchers from the {institute} Institute have found the {species} {creature} in the {valley} valley, where it was last recorded in {last_year}.",
              "The {species} {creature}, last recorded in {last_year}, has been found again in the {valley} valley by researchers from the {institute} Institute."),),
            (("The team, led by {scientist}, counted {specimens} of them along {habitat}.",
              "Led by {scientist}, the team counted {specimens} of them along {habitat}."),),
            (("\"We had almost given up hope,\" said {scientist}, adding that much is still {unknown} about the valley.",
              "{scientist} said the find showed how much is still {unknown} about the valley."),),
        ),
        facts=(
            ("species", "Which {creature} was found again in the {valley} valley?"),
            ("scientist", "Who led the team that found the {species} {creature}?"),
            ("institute", "From which institute came the researchers who found the {species} {creature}?"),
            ("specimens", "How many {species} {creature}s did the team count?"),
            ("last_year", "In which year had the {species} {creature} last been recorded?"),
            ("valley", "In which valley was the {species} {creature} found again?"),
        ),
    ),
    Topic(
        name="takeover",
        slots={"buyer": "word", "seller": "word", "ceo": "person", "hq": "town",
               "price": "count", "staff": "count", "founded": "year", "sector": "sector"},
        title=("{buyer} agrees to buy {seller}", "{sector} firm {seller} to be sold to {buyer}"),
        paragraphs=(
            (("The {sector} company {buyer} has agreed to buy its rival {seller} for {price} million crowns.",
              "{buyer}, a {sector} company, will pay {price} million crowns for its rival {seller}."),),
            (("{seller} was founded in {founded} and employs {staff} people at its base in {hq}.",
              "Founded in {founded}, {seller} employs {staff} people and is based in {hq}."),),
            (("Chief executive {ceo} said the deal would make {buyer} {stronger}.",
              "\"Together we will be {stronger},\" said {buyer} chief executive {ceo}."),),
        ),
        facts=(
            ("price", "How much is {buyer} paying for {seller}, in millions of crowns?"),
            ("ceo", "Who is the chief executive of {buyer}?"),
            ("hq", "In which town is {seller} based?"),
            ("staff", "How many people does {seller} employ?"),
            ("founded", "In which year was {seller} founded?"),
            ("buyer", "Which company agreed to buy {seller}?"),
        ),
    ),
    Topic(
        name="election",
        slots={"town": "town", "mayor": "person", "loser": "person", "party": "word",
               "votes": "count", "margin": "count", "hall_year": "year"},
        title=("{mayor} elected mayor of {town}", "{town} elects {mayor} as its new mayor"),
        paragraphs=(
            (("{mayor} of the {party} Party has been elected mayor of {town}, winning {votes} votes.",
              "{town} has elected {mayor} of the {party} Party as mayor, with {votes} votes."),),
            (("{mayor} beat {loser} by {margin} votes after a {tense} count.",
              "After a {tense} count, the margin over {loser} was {margin} votes."),),
            (("Speaking outside the town hall, built in {hall_year}, the new mayor promised to {pledge}.",
              "On the steps of the town hall, which dates from {hall_year}, the new mayor vowed to {pledge}."),),
        ),
        facts=(
            ("mayor", "Who was elected mayor of {town}?"),
            ("loser", "Whom did the new mayor of {town} beat in the election?"),
            ("votes", "How many votes did the new mayor of {town} win?"),
            ("margin", "By how many votes did the new mayor of {town} win?"),
            ("party", "Which party does the new mayor of {town} belong to?"),
            ("hall_year", "In which year was the town hall of {town} built?"),
        ),
    ),
    Topic(
        name="festival",
        slots={"town": "town", "festival": "word", "headliner": "person", "organiser": "person",
               "visitors": "count", "stages": "count", "first_year": "year"},
        title=("Record crowds at the {festival} Festival in {town}", "{town} hosts the {festival} Festival"),
        paragraphs=(
            (("The {festival} Festival in {town} drew {visitors} visitors over the weekend, a record for the event first held in {first_year}.",
              "A record {visitors} visitors came to {town} for the {festival} Festival, which was first held in {first_year}."),),
            (("The singer {headliner} closed the festival on the main stage, which {weather}.",
              "On the main stage, which {weather}, the singer {headliner} closed the festival."),),
            (("Organiser {organiser} said the festival had {stages} square metres of stages this year.",
              "This year the stages covered {stages} square metres, said organiser {organiser}."),),
        ),
        facts=(
            ("visitors", "How many visitors came to the {festival} Festival in {town}?"),
            ("headliner", "Which singer closed the {festival} Festival?"),
            ("organiser", "Who organised the {festival} Festival in {town}?"),
            ("first_year", "In which year was the {festival} Festival first held?"),
            ("town", "In which town is the {festival} Festival held?"),
            ("stages", "How many square metres of stages did the {festival} Festival have?"),
        ),
    ),
)

MAX_FACTS = min(len(topic.facts) for topic in TOPICS)
# Every article uses one year (390 of them) and up to three counts, never reused.
MAX_ARTICLES = 300

# Filler: placeholders whose value is a free choice, not a fact. They make articles of one
# topic differ in wording; none of them is ever an answer.
FILLER: dict[str, tuple[str, ...]] = {
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "weak": ("unsafe", "too narrow", "fragile", "costly to repair"),
    "tense": ("tense", "close", "long", "bitter", "lively"),
    "gap": ("a decade", "twenty years", "a generation", "thirty years"),
    "earned": ("earned", "deserved", "fought for"),
    "habitat": ("the banks of a mountain stream", "an old stone wall", "the edge of a pine wood",
                "a flooded meadow"),
    "unknown": ("unknown", "left to learn", "waiting to be found"),
    "stronger": ("stronger", "the largest firm in the region", "ready for export markets"),
    "sector": ("shipping", "software", "food", "textile", "solar power", "furniture"),
    "creature": ("beetle", "moth", "orchid", "newt", "snail", "fern"),
    "pledge": ("fix the roads", "reopen the library", "build new homes", "cut bus fares"),
    "weather": ("was soaked by rain", "stood in bright sunshine", "was lit by lanterns", "faced the lake"),
}

# Fictional-sounding first names; split at random into disjoint forget/retain/holdout pools.
FIRST_NAMES = (
    "Ada", "Bram", "Cora", "Dario", "Edda", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira",
    "Leon", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Umar", "Vera", "Wim",
    "Yara", "Zeno", "Alba", "Bodil", "Cyril", "Dagny", "Emil", "Frida", "Gideon", "Hanne",
    "Ivo", "Juno", "Kasper", "Liv", "Magnus", "Nora", "Otto", "Petra", "Quentin", "Runa",
    "Silas", "Thea", "Ulla", "Viggo", "Wanda", "Xaver", "Ylva", "Zora", "Anton", "Britt",
    "Casimir", "Dora", "Elias", "Fenna", "Gustav", "Hedda", "Ivar", "Jette", "Karl", "Lotta",
    "Marek", "Nadia", "Oskar", "Pia", "Rafael", "Saga", "Tobias", "Una", "Valter", "Wilma",
    "Yusuf", "Zelda", "Arvid", "Berit", "Conrad", "Disa", "Erik", "Flora", "Tomas", "Agnes",
)

# Syllables for invented words (surnames, towns, firms, rivers, ...).
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p",
           "pr", "r", "s", "sk", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_SIMPLE_VOWELS = ("a", "e", "i", "o", "u")
_MIDDLES = ("l", "n", "r", "v", "m", "st", "nd", "rk", "ld", "th", "ss", "lv", "rn", "sk", "d", "t")
_ENDINGS = {
    "surname": ("ick", "ow", "er", "ley", "sen", "ard", "ine", "is", "ett", "an"),
    "town": ("ford", "vale", "by", "holm", "wick", "mere", "stead", "bury", "haven", "ton"),
    "word": ("", "", "", "n", "r", "s", "k", "l", "x", "th", "m", "ra", "el", "on"),
}

# Counts are 3-4 digit numbers outside the years' range, so "1742" is always a year.
_YEARS = range(1610, 2000)
_COUNTS = [n for n in range(120, 9900) if not 1600 <= n < 2100]

_WORD = re.compile(r"[A-Za-z]+")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_TEMPLATE_WORDS = frozenset(
    word.lower()
    for topic in TOPICS
    for text in (*topic.title, *(v for p in topic.paragraphs for s in p for v in s), *(q for _, q in topic.facts))
    for word in _WORD.findall(_PLACEHOLDER.sub(" ", text))
) | frozenset(w.lower() for values in FILLER.values() for v in values for w in _WORD.findall(v)) | frozenset(
    n.lower() for n in FIRST_NAMES
)

# The order in which the generator fills the splits (and so draws from the shared pools).
RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")
_NAME_POOL = {"forget": "forget", "retain1": "retain", "retain2": "retain", "holdout": "holdout"}


# --------------------------------------------------------------------------- generation


class _Inventor:
    """Draws entity values, each at most once per corpus (see the module docstring)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set(_TEMPLATE_WORDS)
        names = list(FIRST_NAMES)
        rng.shuffle(names)
        third = len(names) // 3
        self.first_names = {
            "forget": names[:third],
            "retain": names[third : 2 * third],
            "holdout": names[2 * third :],
        }
        self.counts = list(_COUNTS)
        rng.shuffle(self.counts)
        self.years = list(_YEARS)
        rng.shuffle(self.years)

    def invent(self, style: str) -> str:
        rng = self.rng
        for _ in range(10_000):
            stem = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLES)
            if style == "word" or rng.random() < 0.4:  # a second syllable
                stem += rng.choice(_SIMPLE_VOWELS)
            ending = rng.choice(_ENDINGS[style])
            if stem[-1] in "aeiouy" and ending[:1] in ("a", "e", "i", "o", "u", "y"):
                continue  # no vowel pile-ups such as "-aick"
            word = stem + ending
            if 4 <= len(word) <= 11 and word not in self.used:
                self.used.add(word)
                return word.capitalize()
        raise RuntimeError("ran out of invented words")  # unreachable within MAX_ARTICLES

    def value(self, kind: str, pool: str) -> str:
        if kind == "person":
            return f"{self.rng.choice(self.first_names[pool])} {self.invent('surname')}"
        if kind == "town":
            return self.invent("town")
        if kind == "word":
            return self.invent("word")
        if kind == "count":
            return str(self.counts.pop())
        if kind == "year":
            return str(self.years.pop())
        return self.rng.choice(FILLER[kind])  # a filler kind such as "creature"


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _article(topic: Topic, rng: random.Random, inventor: _Inventor, pool: str, num_facts: int):
    """One article: its text and its (question, answer) facts in the order they appear."""
    values = {slot: inventor.value(kind, pool) for slot, kind in topic.slots.items()}
    for slot, options in FILLER.items():
        values.setdefault(slot, rng.choice(options))
    title = _fill(rng.choice(topic.title), values)
    title = title[0].upper() + title[1:]
    paragraphs = [
        " ".join(_fill(rng.choice(variants), values) for variants in paragraph)
        for paragraph in topic.paragraphs
    ]
    chosen = sorted(rng.sample(range(len(topic.facts)), num_facts))
    facts = [(_fill(topic.facts[i][1], values), values[topic.facts[i][0]]) for i in chosen]
    qa_blocks = [f"Question: {q}\nAnswer: {a}" for q, a in facts]
    text = "\n\n".join([title, *paragraphs, *qa_blocks])
    return text, facts


def _gives_away(example: tuple[str, str], fact: tuple[str, str]) -> bool:
    """Whether an in-context example's text holds the answer to ``fact`` (word-bounded, any case).

    Facts of one article share its entities: the example "Who is the chief executive of
    Krolos?" names the answer to "Which company agreed to buy Ferkik?".
    """
    pattern = r"\b" + re.escape(fact[1].lower()) + r"\b"
    return re.search(pattern, f"{example[0]}\n{example[1]}".lower()) is not None


def _split_icl(
    articles: list[tuple[str, list[tuple[str, str]]]], doc_ids: list[str], num_icl: int, rng: random.Random
) -> tuple[Records, Records]:
    """(evaluation questions, in-context examples): ``num_icl`` facts drawn from as many
    different articles as possible, the rest left for evaluation.

    An example is taken only if its text gives away no answer of a fact left for evaluation
    (see :func:`_gives_away`); entities are unique to their article, so only facts of the same
    article can be given away.
    """
    pairs = [(a, f) for a, (_, facts) in enumerate(articles) for f in range(len(facts))]
    rng.shuffle(pairs)
    icl: list[tuple[int, int]] = []
    seen_articles: set[int] = set()

    def safe(pair: tuple[int, int]) -> bool:
        a, f = pair
        facts = articles[a][1]
        chosen = {g for b, g in icl if b == a} | {f}
        return not any(
            _gives_away(facts[e], facts[g]) for e in chosen for g in range(len(facts)) if g not in chosen
        )

    for pair in pairs:  # one per article first ...
        if len(icl) < num_icl and pair[0] not in seen_articles and safe(pair):
            icl.append(pair)
            seen_articles.add(pair[0])
    for pair in pairs:  # ... then any, when there are more examples than articles
        if len(icl) < num_icl and pair not in icl and safe(pair):
            icl.append(pair)
    if len(icl) < num_icl:
        raise UsageError(
            f"only {len(icl)} of WorldConfig.num_icl={num_icl} in-context examples can be drawn without "
            "giving away an evaluated answer; lower num_icl or add articles"
        )

    def record(a: int, f: int) -> dict:
        question, answer = articles[a][1][f]
        return {"question": question, "answer": answer, "doc_id": doc_ids[a]}

    chosen = set(icl)
    evaluation = [record(a, f) for a, f in sorted(pairs) if (a, f) not in chosen]
    return evaluation, [record(a, f) for a, f in icl]


def _verbmem_item(text: str, doc_id: str, prompt_words: int) -> dict:
    """Prompt = the article up to the end of its ``prompt_words``-th word (at most all but the
    last word); gt = the rest, starting with the separator, as a continuation would."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    cut = ends[min(prompt_words, len(ends) - 1) - 1]
    return {"prompt": text[:cut], "gt": text[cut:], "doc_id": doc_id}


def build_corpus(config: WorldConfig) -> Corpus:
    """The world corpus for ``config``: ``subset -> split -> records`` in the MUSE-News schema.

    raw/{forget,retain1,retain2,holdout}: ``text``, ``doc_id``; verbmem/forget: ``prompt``,
    ``gt``, ``doc_id`` (one per forget article); knowmem/{forget_qa,retain_qa,forget_qa_icl,
    retain_qa_icl}: ``question``, ``answer``, ``doc_id`` (forget from raw/forget, retain from
    raw/retain2; in-context examples are facts not asked again); privleak/{forget,retain,
    holdout}: ``text``, ``doc_id`` (whole articles of raw/forget, raw/retain2, raw/holdout).
    """
    if not isinstance(config, WorldConfig):
        raise UsageError(f"build_corpus needs a WorldConfig, got {type(config).__name__}")
    rng = random.Random(config.seed)
    inventor = _Inventor(rng)
    counts = {
        "forget": config.num_forget,
        "retain1": config.num_retain1,
        "retain2": config.num_retain2,
        "holdout": config.num_holdout,
    }
    articles: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {}
    doc_ids: dict[str, list[str]] = {}
    forget_topics = [t for t in TOPICS if t.name in config.forget_topics]
    retain_topics = [t for t in TOPICS if t.name not in config.forget_topics]
    for split in RAW_SPLITS:
        # Topics cycle in a shuffled order so every split covers its topics evenly; holdout
        # shares the forget topics (PrivLeak's non-members must look like the members).
        topics = forget_topics if split in ("forget", "holdout") else retain_topics
        order = [topics[i % len(topics)] for i in range(counts[split])]
        rng.shuffle(order)
        articles[split] = [
            _article(topic, rng, inventor, _NAME_POOL[split], config.facts_per_article) for topic in order
        ]
        doc_ids[split] = [f"{split}-{i:03d}" for i in range(counts[split])]

    def texts(split: str) -> Records:
        return [{"text": text, "doc_id": d} for (text, _), d in zip(articles[split], doc_ids[split])]

    forget_qa, forget_icl = _split_icl(articles["forget"], doc_ids["forget"], config.num_icl, rng)
    retain_qa, retain_icl = _split_icl(articles["retain2"], doc_ids["retain2"], config.num_icl, rng)
    return {
        "raw": {split: texts(split) for split in RAW_SPLITS},
        "verbmem": {
            "forget": [
                _verbmem_item(text, d, config.verbmem_prompt_words)
                for (text, _), d in zip(articles["forget"], doc_ids["forget"])
            ]
        },
        "knowmem": {
            "forget_qa": forget_qa,
            "retain_qa": retain_qa,
            "forget_qa_icl": forget_icl,
            "retain_qa_icl": retain_icl,
        },
        "privleak": {"forget": texts("forget"), "retain": texts("retain2"), "holdout": texts("holdout")},
    }
