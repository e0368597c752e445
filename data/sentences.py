"""A deterministic generator of simple English sentences over a few hundred common words.

The mini corpus needs text that a small recogniser can learn in minutes: a closed vocabulary,
grammatical word order (so that a beam search or a language model has something to exploit), and
enough combinations that test sentences never occur in training.
"""

from __future__ import annotations

import random

DETERMINERS = "the a this that my your his her our their every some no one each".split()
ADJECTIVES = (
    "big small old new good bad long short high low young great little early late black white red "
    "green blue brown dark light warm cold hot quiet loud happy sad strong weak fast slow clean "
    "empty full heavy soft hard rich poor simple strange busy tired kind bright deep open"
).split()
NOUNS = (
    "man woman child boy girl friend mother father brother sister teacher doctor farmer king queen "
    "dog cat horse bird fish house room door window table chair bed book letter paper story song "
    "city town village river road street garden field tree flower forest mountain sea ship boat "
    "car train bread water milk coffee apple money box bag hat coat shoe key clock picture lamp "
    "morning evening night day week winter summer fire stone bridge church school market island"
).split()
PLURALS = {
    n: (
        n + "es"
        if n.endswith(("s", "sh", "ch", "x"))
        else n[:-1] + "ies"
        if n.endswith("y") and n[-2] not in "aeiou"
        else n + "s"
    )
    for n in NOUNS
}
PLURALS.update(
    {"man": "men", "woman": "women", "child": "children", "fish": "fish", "shoe": "shoes", "knife": "knives"}
)
TRANSITIVE = (
    "saw found took gave made kept left brought bought sold opened closed carried painted washed "
    "moved watched followed helped called liked loved wanted needed read wrote built broke lost "
    "held showed cleaned filled reached touched"
).split()
INTRANSITIVE = "slept waited smiled laughed walked ran sang stayed worked played fell arrived stopped listened".split()
PREPOSITIONS = "in on near under behind over across along into from with beside through".split()
ADVERBS = "quickly slowly quietly again today yesterday always never often soon early late there here".split()
NAMES = "john mary peter anne thomas alice henry emma james lucy robert grace david helen".split()
CONJUNCTIONS = "and but so because while when".split()

VOCABULARY = sorted(
    set(
        DETERMINERS
        + ADJECTIVES
        + NOUNS
        + list(PLURALS.values())
        + TRANSITIVE
        + INTRANSITIVE
        + PREPOSITIONS
        + ADVERBS
        + NAMES
        + CONJUNCTIONS
    )
)


def _noun_phrase(rng: random.Random) -> list[str]:
    if rng.random() < 0.15:
        return [rng.choice(NAMES)]
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    noun = rng.choice(NOUNS)
    plural_ok = words[0] in {"the", "my", "your", "his", "her", "our", "their", "some", "no"}
    words.append(PLURALS[noun] if plural_ok and rng.random() < 0.3 else noun)
    return words


def _clause(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng)
    if rng.random() < 0.65:
        words += [rng.choice(TRANSITIVE)] + _noun_phrase(rng)
    else:
        words.append(rng.choice(INTRANSITIVE))
    if rng.random() < 0.45:
        words += [rng.choice(PREPOSITIONS)] + _noun_phrase(rng)
    if rng.random() < 0.25:
        words.append(rng.choice(ADVERBS))
    return words


def sentence(rng: random.Random) -> str:
    """One sentence in LibriSpeech's transcript style: upper case, no punctuation."""
    words = _clause(rng)
    if rng.random() < 0.3:
        words += [rng.choice(CONJUNCTIONS)] + _clause(rng)
    return " ".join(words).upper()


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[str]:
    """``n`` distinct sentences, deterministic for ``seed``, none of them in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct sentences (got {len(out)})")
        s = sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
