"""A seeded, TL;DR-shaped synthetic preference set with known ground truth.

Why: the project must run and be checked offline, and pruning methods can only
be scored for *detection* when we know which labels are wrong. Each post states
a few key facts; each candidate summary has a latent quality that rewards
covering those facts (reusing the post's exact wording), punishes hallucinated
facts (people/objects the post never mentions) and punishes length beyond an
ideal (recognisable filler phrases). Annotators label pairs with Bradley-Terry
noise, a controlled share of them answer at random, and one prefers the longer
summary. ``valid2`` (the test split) is labelled by the true preference.

The file is written in the TL;DR comparisons layout, so the normal reader loads
it; the ground truth travels in ``extra`` (``true_choice``, ``label_flipped``,
``worker_kind``, ``quality``). Texts are short so that a MiniLM reward model
with ``max_length=128`` sees whole examples.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from prefprune.files import cache_home, write_text_atomic

#: Bump when the output for a given seed changes; part of the cache key.
GENERATOR_VERSION = 1
POLICIES = ("sup_good", "sup_bad", "verbose", "hallucinating")

_NAMES = ("Jake", "Emma", "Liam", "Sofia", "Noah", "Chloe", "Ethan", "Mia", "Lucas", "Ava",
          "Owen", "Zoe", "Ryan", "Lily", "Dylan", "Grace", "Marcus", "Nina", "Tyler", "Hannah",
          "Omar", "Priya", "Diego", "Yuki")
_RELATIONS = ("roommate", "girlfriend", "boyfriend", "brother", "sister", "coworker",
              "best friend", "boss", "neighbor", "cousin")
_OBJECTS = ("car", "laptop", "bike", "guitar", "camera", "phone", "jacket", "couch", "watch",
            "tent", "drone", "piano")
_PLACES = ("bakery", "warehouse", "hospital", "library", "gym", "hotel", "pharmacy", "museum")
_CITIES = ("Denver", "Boston", "Austin", "Seattle", "Chicago", "Portland", "Phoenix", "Miami")
_MONTHS = ("March", "April", "May", "June", "July", "August")
_DAYS = ("Monday", "Tuesday", "Friday", "weekend")
_FEELINGS = ("angry", "confused", "hurt", "anxious", "guilty", "jealous")
_SUBREDDITS = ("relationships", "relationship_advice", "tifu", "personalfinance", "AskReddit",
               "legaladvice")
_FACTS = (
    "{who} borrowed my {obj} without asking",
    "{who} broke my {obj} last {day}",
    "I lent {who} {money} dollars in {month}",
    "I lost my job at the {place}",
    "I moved to {city} for a new job",
    "{who} moved in with me in {month}",
    "I feel {feeling} about {who}",
    "I found out {who} lied about the {obj}",
    "{who} wants me to sell my {obj}",
    "{who} forgot my birthday again",
    "{who} keeps reading my messages",
    "I started night shifts at the {place}",
)
_TITLES = ("Need advice about my {rel}", "Not sure what to do about {name}",
           "My {rel} and I are fighting", "Is this normal? ({rel} problems)")
_POST_FILLER = ("This has been going on for a few weeks.", "I have tried to talk about it calmly.",
                "We used to get along really well.", "Everyone I asked has a different opinion.")
_CLOSINGS = ("What should I do?", "Am I overreacting?", "How do I handle this?")
_VAGUE = ("there is some drama going on", "things have been weird lately")
_OPENERS = ("long story short, so basically", "okay so basically")
_CLOSERS = ("and yeah that is basically it honestly", "and honestly I do not know what to think")


@dataclass(frozen=True)
class _Post:
    """A generated post: its prompt fields and the key fact clauses it states."""

    id: str
    subreddit: str
    title: str
    text: str
    facts: tuple[str, ...]
    names: frozenset[str]


def _pick(rng: random.Random, pool: tuple[str, ...], exclude: frozenset[str]) -> str:
    return rng.choice([v for v in pool if v not in exclude])


def _slots(rng: random.Random, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """Random slot values, avoiding the words in ``exclude`` (a post's own names/objects)."""
    return {"name": _pick(rng, _NAMES, exclude), "rel": rng.choice(_RELATIONS),
            "obj": _pick(rng, _OBJECTS, exclude), "place": _pick(rng, _PLACES, exclude),
            "city": _pick(rng, _CITIES, exclude), "month": rng.choice(_MONTHS),
            "day": rng.choice(_DAYS), "feeling": rng.choice(_FEELINGS),
            "money": str(rng.choice(range(50, 1000, 50)))}


def _fill(template: str, slots: dict[str, str]) -> str:
    """A fact clause; a person is named by first name only, to keep texts short."""
    return template.format(who=slots["name"], **slots)


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


def _make_post(rng: random.Random, index: int) -> _Post:
    """A short Reddit-style post with 3-4 key facts (the first one opens) and non-key filler."""
    slots = _slots(rng)
    facts = tuple(_fill(t, slots) for t in rng.sample(_FACTS, rng.choice((3, 3, 4))))
    body = [_sentence(f) for f in facts[1:]] + rng.sample(_POST_FILLER, rng.choice((0, 1)))
    rng.shuffle(body)
    intro = f"Me ({rng.randint(19, 45)}{rng.choice('MF')}) and my {slots['rel']} {slots['name']}."
    text = " ".join([intro, _sentence(facts[0]), *body, rng.choice(_CLOSINGS)])
    title = rng.choice(_TITLES).format(**slots)
    names = frozenset(v for k, v in slots.items() if k in ("name", "obj", "place", "city"))
    return _Post(f"syn{index:05d}", rng.choice(_SUBREDDITS), title, text, facts, names)


def _summary(rng: random.Random, post: _Post, policy: str) -> tuple[str, float]:
    """One summary by ``policy`` and its latent quality."""
    n = len(post.facts)
    covered_n, halluc_n, verbose = {
        "sup_good": (n - rng.choice((0, 0, 1)), 0, False),
        "sup_bad": (rng.choice((1, 1, 2)), int(rng.random() < 0.1), False),
        "verbose": (n - rng.choice((0, 1)), 0, True),
        "hallucinating": (rng.randint(1, n - 1), rng.choice((1, 1, 2)), False),
    }[policy]
    covered = sorted(rng.sample(range(n), covered_n))
    clauses = [post.facts[i] for i in covered]
    if policy == "sup_bad":
        clauses.append(rng.choice(_VAGUE))
    for _ in range(halluc_n):
        fake = _fill(rng.choice(_FACTS), _slots(rng, exclude=post.names))
        clauses.insert(rng.randint(0, len(clauses)), fake)
    body = ", ".join(clauses[:-1]) + (" and " if len(clauses) > 1 else "") + clauses[-1]
    if verbose:
        body = f"{rng.choice(_OPENERS)} {body}, {rng.choice(_CLOSERS)}"
    text = _sentence(body)
    ideal = sum(len(f.split()) for f in post.facts) + 2
    excess = max(0, len(text.split()) - ideal)
    quality = 3.0 * covered_n / n - 1.5 * halluc_n - 0.12 * excess + rng.uniform(-0.15, 0.15)
    return text, round(quality, 4)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _label(rng: random.Random, kind: str, q: list[float], texts: list[str],
           beta: float) -> tuple[int, int | None]:
    """Choice (index of the preferred summary) and confidence 1-9 by an annotator kind."""
    if kind == "oracle":
        return (0 if q[0] >= q[1] else 1), 9
    if kind == "random":
        choice, confidence = rng.randint(0, 1), rng.randint(1, 9)
    elif kind == "length_biased":
        choice = 0 if len(texts[0].split()) >= len(texts[1].split()) else 1
        confidence = rng.randint(6, 9)
    else:
        p_first = _sigmoid(beta * (q[0] - q[1]))
        choice = 0 if rng.random() < p_first else 1
        sureness = abs(2 * p_first - 1)
        confidence = min(9, max(1, round(1 + 8 * sureness + rng.gauss(0, 1))))
    return choice, (None if rng.random() < 0.1 else confidence)


def _workers(rng: random.Random, n_reliable: int, n_random: int) -> dict[str, list[str]]:
    """Worker ids by kind; ids are shuffled so the kind cannot be read off the id."""
    kinds = ["reliable"] * n_reliable + ["random"] * n_random + ["length_biased"]
    ids = [f"w{i:02d}" for i in range(len(kinds))]
    rng.shuffle(ids)
    pools: dict[str, list[str]] = {"reliable": [], "random": [], "length_biased": []}
    for worker, kind in zip(ids, kinds):
        pools[kind].append(worker)
    return pools


def _pick_worker(rng: random.Random, pools: dict[str, list[str]], random_share: float,
                 length_share: float) -> tuple[str, str]:
    """A (worker id, kind) for one noisy comparison."""
    u = rng.random()
    kind = ("random" if u < random_share
            else "length_biased" if u < random_share + length_share else "reliable")
    return rng.choice(pools[kind]), kind


def _split_of(index: int, n_posts: int, weights: tuple[float, float, float]) -> str:
    """Posts are assigned to splits in contiguous blocks, so a post is in one split only."""
    cut_train = round(n_posts * weights[0] / sum(weights))
    cut_valid = round(n_posts * (weights[0] + weights[1]) / sum(weights))
    return "train" if index < cut_train else "valid1" if index < cut_valid else "valid2"


def generate_synthetic(
    path: str | os.PathLike,
    *,
    n_posts: int = 867,
    seed: int = 0,
    split_weights: tuple[float, float, float] = (8, 2, 3),
    beta: float = 2.5,
    random_worker_share: float = 0.15,
    length_biased_share: float = 0.08,
    n_reliable_workers: int = 10,
    n_random_workers: int = 2,
) -> Path:
    """Write the synthetic comparisons as TL;DR-layout JSONL (atomically) and return the path.

    Each post gets one or two comparisons between summaries of two different
    policies. With the defaults there are about 800 train, 200 valid1 and 300
    valid2 comparisons. Same arguments -> byte-identical file.
    """
    rng = random.Random(seed)
    pools = _workers(rng, n_reliable_workers, n_random_workers)
    lines = []
    for index in range(n_posts):
        split = _split_of(index, n_posts, split_weights)
        post = _make_post(rng, index)
        for _ in range(rng.choice((1, 2))):
            worker, kind = (("oracle", "oracle") if split == "valid2" else
                            _pick_worker(rng, pools, random_worker_share, length_biased_share))
            record = _comparison(rng, post, split, worker, kind, beta, len(lines))
            lines.append(json.dumps(record, ensure_ascii=False))
    return write_text_atomic(Path(path), "\n".join(lines) + "\n")


def _comparison(rng: random.Random, post: _Post, split: str, worker: str, kind: str,
                beta: float, number: int) -> dict:
    """One TL;DR-layout comparison record with ground truth in ``extra``."""
    policies = rng.sample(POLICIES, 2)
    made = [_summary(rng, post, p) for p in policies]
    texts, quality = [t for t, _ in made], [q for _, q in made]
    choice, confidence = _label(rng, kind, quality, texts, beta)
    true_choice = 0 if quality[0] >= quality[1] else 1
    return {
        "info": {"id": post.id, "post": post.text, "title": post.title,
                 "subreddit": post.subreddit, "article": None, "site": None},
        "summaries": [{"text": t, "policy": p, "note": None} for t, p in zip(texts, policies)],
        "choice": choice,
        "worker": worker,
        "batch": f"{split}_batch{number // 100}",
        "split": split,
        "extra": {"confidence": confidence, "true_choice": true_choice,
                  "label_flipped": choice != true_choice, "worker_kind": kind,
                  "quality": quality},
    }


def default_dataset_path(seed: int = 0) -> Path:
    """The default synthetic set in the user cache, generated once per version and seed."""
    path = cache_home() / f"synthetic-tldr-v{GENERATOR_VERSION}-seed{seed}.jsonl"
    if not path.exists():
        generate_synthetic(path, seed=seed)
    return path


def expert_validation(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the ``valid1`` comparisons of a synthetic file relabelled by the generator's truth:
    the small expert-labelled set a user would bring as a trusted influence target.

    The pairs are those of the source's validation split, so a run can compare the noisy
    target (labels from the same simulated annotators as training) with this trusted one.
    """
    lines = []
    for line in Path(source).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("split") != "valid1":
            continue
        truth = record["extra"]["true_choice"]
        record.update(choice=truth, worker="expert",
                      extra={**record["extra"], "label_flipped": False, "worker_kind": "expert"})
        lines.append(json.dumps(record, ensure_ascii=False))
    return write_text_atomic(Path(path), "\n".join(lines) + "\n")


def default_expert_validation_path(seed: int = 0) -> Path:
    """The expert-labelled validation set of :func:`default_dataset_path` (same cache)."""
    path = cache_home() / f"synthetic-tldr-v{GENERATOR_VERSION}-seed{seed}-expert-valid1.jsonl"
    if not path.exists():
        expert_validation(default_dataset_path(seed), path)
    return path
