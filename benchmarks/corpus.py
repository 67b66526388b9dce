"""Synthetic, reproducible corpora for the benchmarks: distinct English image captions."""

import random

NOUNS = (
    "dog", "cat", "man", "woman", "child", "girl", "boy", "horse", "bird", "car", "bicycle", "truck", "boat",
    "train", "bus", "tree", "house", "building", "bridge", "table", "chair", "phone", "laptop", "pizza",
    "sandwich", "cake", "umbrella", "kite", "surfboard", "skateboard", "guitar", "cow", "sheep", "elephant",
    "giraffe", "zebra", "bear", "teddy bear", "clock", "vase", "book", "bench", "motorcycle", "airplane",
    "fire hydrant", "stop sign", "traffic light", "couple", "player", "chef", "puppy", "kitten", "duck",
)
ADJECTIVES = (
    "small", "large", "old", "young", "happy", "tired", "wet", "fluffy", "shiny", "wooden", "tall", "tiny",
    "busy", "empty", "crowded", "quiet", "colorful", "dirty", "clean", "modern", "rusty", "cute", "sleepy",
)
COLOURS = ("black", "white", "red", "blue", "green", "yellow", "brown", "grey", "orange", "pink", "purple")
VERBS = (
    "running", "sitting", "standing", "walking", "jumping", "sleeping", "eating", "playing", "riding",
    "looking", "waiting", "lying", "parked", "flying", "swimming", "resting", "posing", "driving",
)
PREPOSITIONS = ("on", "in", "near", "under", "beside", "behind", "across", "along", "at", "next to", "in front of")
PLACES = (
    "beach", "street", "park", "kitchen", "field", "road", "river", "lake", "snow", "grass", "sidewalk",
    "table", "bed", "couch", "city", "forest", "mountain", "airport", "station", "market", "garden", "desk",
    "harbor", "stadium", "parking lot", "living room", "bathroom", "hill", "farm", "window",
)
TIMES = (
    "at sunset", "at night", "in the morning", "during the day", "in the rain", "in winter", "on a sunny day",
    "at dawn", "in the evening", "on a cloudy afternoon",
)
EXTRAS = (
    "{n} people watching", "with {n} friends", "while {n} cars pass by", "next to a {c} {o}",
    "holding a {o}", "with a {c} {o} nearby", "in {y}", "near {n} {os}", "as a {o} looks on",
    "and a {a} {o} behind it", "with the number {n} on it",
)


def _plural(noun: str) -> str:
    if noun.endswith(("sheep", "deer")):
        return noun
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    return noun + "s"


def _phrase(rng: random.Random) -> str:
    """One caption: subject, action, place, and optionally a time and an extra clause."""
    subject = [rng.choice(("a", "the", "one", str(rng.randint(2, 12))))]
    subject += [w for w, p in ((rng.choice(ADJECTIVES), 0.4), (rng.choice(COLOURS), 0.5)) if rng.random() < p]
    noun = rng.choice(NOUNS)
    subject.append(_plural(noun) if subject[0].isdigit() else noun)
    words = subject + [rng.choice(VERBS), rng.choice(PREPOSITIONS), rng.choice(("the", "a"))]
    if rng.random() < 0.3:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(PLACES))
    text = " ".join(words)
    if rng.random() < 0.5:
        text += " " + rng.choice(TIMES)
    if rng.random() < 0.6:
        extra = rng.choice(EXTRAS).format(
            n=rng.randint(2, 99), c=rng.choice(COLOURS), o=rng.choice(NOUNS), os=_plural(rng.choice(NOUNS)),
            a=rng.choice(ADJECTIVES),
            y=rng.randint(1950, 2024),
        )
        text += rng.choice((", ", " ", "; ")) + extra
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + rng.choice(("", "", ".", ".", "!"))


def ordinary_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of 5 to 20 words, like "a black dog running on the beach at sunset, 2 people watching".

    Args:
        n: number of captions.
        seed: the same seed gives the same list.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    captions: list[str] = []
    while len(captions) < n:
        text = _phrase(rng)
        if 5 <= len(text.split()) <= 20 and text not in seen:
            seen.add(text)
            captions.append(text)
    return captions
