"""Synthetic guanaco-style conversations: a small, deterministic stand-in for openassistant-guanaco.

The rows are built from templates and word banks (nothing copied from the real data set) so that tests and
smoke runs work without network. Each topic answers in one fixed style (recipes as numbered steps, code
answers as "In {language} ...", and so on) so that a tiny model's eval loss visibly drops within ~20 steps.

    python -m herd.sample_data data/sample/guanaco_sample.jsonl --n 400 --seed 0
    python -m herd.sample_data data/sample/llama2_sample.jsonl --n 200 --seed 0 --format llama2
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from herd.chat import format_llama2, messages_to_guanaco

MIN_WORDS, MAX_WORDS = 10, 150  # assistant answer length range, like the short-to-medium guanaco answers

# --- word banks -----------------------------------------------------------------------------------------

DISHES = {
    "pancakes": ["flour", "milk", "eggs", "butter", "sugar"],
    "tomato soup": ["tomatoes", "onion", "garlic", "vegetable stock", "cream"],
    "banana bread": ["ripe bananas", "flour", "sugar", "eggs", "baking soda"],
    "fried rice": ["cooked rice", "eggs", "soy sauce", "spring onions", "peas"],
    "lentil curry": ["red lentils", "coconut milk", "onion", "curry powder", "ginger"],
    "an omelette": ["eggs", "butter", "cheese", "salt", "chives"],
    "guacamole": ["avocados", "lime juice", "red onion", "coriander", "salt"],
    "pizza dough": ["flour", "yeast", "warm water", "olive oil", "salt"],
    "roasted vegetables": ["carrots", "peppers", "courgettes", "olive oil", "thyme"],
    "a lemon cake": ["flour", "butter", "sugar", "eggs", "lemons"],
    "a chicken stir fry": ["chicken breast", "broccoli", "soy sauce", "garlic", "ginger"],
    "mushroom risotto": ["arborio rice", "mushrooms", "parmesan", "white wine", "stock"],
}
COOK_STEPS = [
    "Heat a large pan over medium heat and add a little oil.",
    "Chop the {a} and the {b} into small, even pieces.",
    "Mix the {a} with the {b} in a large bowl until smooth.",
    "Add the {a} and cook for about {m} minutes, stirring often.",
    "Season with salt and pepper, then taste and adjust.",
    "Pour the mixture into the pan and let it cook gently for {m} minutes.",
    "Stir in the {b} and keep cooking until everything is hot.",
    "Bake in a preheated oven at 180 degrees for {m} minutes.",
    "Let it rest for a few minutes before serving.",
    "Whisk the {a} until light, then fold in the {b}.",
]
COOK_TIPS = [
    "Tip: prepare all the ingredients before you start, because the cooking goes quickly.",
    "Tip: fresh {a} makes a big difference to the flavour.",
    "Tip: it keeps well in the fridge for two days.",
    "Tip: a pinch of salt at the end brings out the flavour.",
]

LANGUAGES = {
    "Python": ("the built-in functions", "list comprehensions"),
    "JavaScript": ("the standard library", "arrow functions"),
    "Rust": ("the standard library", "iterators"),
    "Go": ("the standard packages", "simple loops"),
    "Java": ("the collections framework", "streams"),
    "C": ("the standard library", "plain loops and pointers"),
}
CODE_TASKS = {
    "reverse a string": "walk over the characters from the end to the start",
    "read a file line by line": "open the file and iterate over its lines",
    "sort a list of numbers": "call the sort function, which sorts in place",
    "remove duplicates from a list": "keep a set of the items you have already seen",
    "count the words in a text": "split the text on whitespace and count the pieces",
    "parse a JSON string": "pass the string to the JSON decoder and check for errors",
    "find the largest number in a list": "keep the biggest value seen so far while you loop",
    "check if a number is prime": "try to divide it by every number up to its square root",
}
CODE_NOTES = [
    "This runs in linear time, which is fine for most inputs.",
    "Remember to handle the empty case separately.",
    "Write a small test first so that you know the function works.",
    "If performance matters, measure before you optimize.",
    "Give the function a clear name so that the code explains itself.",
    "Most editors can format this for you automatically.",
    "Error handling is important here, because the input may be invalid.",
]

CITIES = {
    "Lisbon": ("Portugal", "spring", "the old tram lines and the viewpoints over the river"),
    "Kyoto": ("Japan", "autumn", "the temples, the gardens and the quiet side streets"),
    "Cape Town": ("South Africa", "late summer", "Table Mountain and the long beaches"),
    "Vancouver": ("Canada", "summer", "the mountains, the sea wall and the parks"),
    "Marrakesh": ("Morocco", "spring", "the markets, the riads and the gardens"),
    "Edinburgh": ("Scotland", "August", "the castle, the old town and the festival"),
    "Hanoi": ("Vietnam", "autumn", "the lakes, the street food and the old quarter"),
    "Buenos Aires": ("Argentina", "spring", "the cafes, the tango halls and the markets"),
}
TRAVEL_TIPS = [
    "Book your accommodation early, because the best places fill up quickly.",
    "Walking is the best way to see the centre.",
    "Public transport is cheap and easy to use.",
    "Try the local food at small family restaurants.",
    "Carry some cash, because not every shop takes cards.",
    "Learn a few words of the local language; people appreciate it.",
    "Plan one quiet day, because travelling every day is tiring.",
    "Check the opening hours of museums before you go.",
]

CONCEPTS = {
    "photosynthesis": (
        "the process plants use to turn light, water and carbon dioxide into sugar and oxygen",
        "Chlorophyll in the leaves absorbs the light and drives the reaction.",
    ),
    "gravity": (
        "the force that pulls masses towards each other",
        "The more mass an object has, the stronger its pull.",
    ),
    "the water cycle": (
        "the continuous movement of water between the sea, the air and the land",
        "Water evaporates, forms clouds, falls as rain and flows back to the sea.",
    ),
    "DNA": (
        "the molecule that carries the genetic instructions of living things",
        "It is made of two strands twisted into a double helix.",
    ),
    "a black hole": (
        "a region of space where gravity is so strong that not even light can escape",
        "Most form when a very large star collapses at the end of its life.",
    ),
    "a volcano": (
        "an opening in the crust of the Earth where molten rock reaches the surface",
        "Pressure from gas in the magma causes the eruptions.",
    ),
    "magnetism": (
        "a force produced by moving electric charges",
        "Every magnet has a north pole and a south pole.",
    ),
    "an atom": (
        "the smallest unit of a chemical element",
        "It has a nucleus of protons and neutrons with electrons around it.",
    ),
}
SCIENCE_EXTRA = [
    "Scientists study it with careful experiments and measurements.",
    "It was understood step by step over many years of research.",
    "You can see its effects in everyday life.",
    "It is one of the basic ideas taught in school science.",
    "Models of it are tested against new observations all the time.",
    "Many open questions about it remain.",
    "A good way to picture it is to draw a simple diagram and label each part.",
    "Textbooks usually start with the basic idea and then add the details one at a time.",
    "Engineers and doctors use this knowledge in their daily work, often without thinking about it.",
    "If you want to learn more, a short documentary or an introductory book is a good next step.",
]

EVENTS = {
    "the invention of the printing press": ("around 1440", "Johannes Gutenberg", "books became cheap"),
    "the French Revolution": ("in 1789", "the people of Paris", "the monarchy was overthrown"),
    "the Apollo 11 mission": ("in 1969", "Neil Armstrong and Buzz Aldrin", "humans walked on the Moon"),
    "the fall of the Berlin Wall": ("in 1989", "the citizens of East Berlin", "Germany was reunited"),
    "the Industrial Revolution": ("from about 1760", "inventors such as James Watt", "factories spread"),
    "the building of the Great Pyramid": ("around 2560 BC", "the workers of ancient Egypt", "a wonder stood"),
    "the Silk Road trade": ("from the second century BC", "merchants of many lands", "goods and ideas moved"),
    "the Renaissance": ("from the fourteenth century", "artists such as Leonardo", "art and science grew"),
}
HISTORY_EXTRA = [
    "Historians still debate its causes.",
    "Its effects can still be seen today.",
    "Many sources from the time have survived.",
    "It changed the lives of ordinary people.",
    "It is often taught as a turning point.",
    "Museums hold many objects from this period.",
    "Letters, diaries and official records from the time help us understand what people thought.",
    "The story is more complicated than the short version, because many groups were involved.",
    "Some of the ideas from this period shaped laws and institutions that still exist.",
    "If you want to read more, a good general history book is a fine place to start.",
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer clearly and briefly.",
    "You are a patient teacher who explains things step by step.",
    "You are a helpful, respectful and honest assistant.",
]

# --- one generator per topic: (question, answer) with a per-topic answer style ---------------------------


def _fit(
    sentences: list[str], rng: random.Random, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS
) -> str:
    """Join the first sentences, keeping a random word budget between min_words and max_words."""
    budget = rng.choice([rng.randint(min_words, 40), rng.randint(30, 90), rng.randint(60, max_words)])
    kept: list[str] = []
    words = 0
    for sentence in sentences:
        n = len(sentence.split())
        if words >= min_words and words + n > budget:
            break
        kept.append(sentence)
        words += n
    return " ".join(kept)


def _cooking(rng: random.Random) -> tuple[str, str]:
    dish = rng.choice(sorted(DISHES))
    ingredients = DISHES[dish]
    people = rng.randint(2, 6)
    question = rng.choice(
        [
            f"How do I make {dish}?",
            f"What is a good recipe for {dish}?",
            f"Can you give me a quick recipe for {dish} for {people} people?",
            f"I want to cook {dish} tonight. Where do I start?",
        ]
    )
    a, b = rng.sample(ingredients, 2)
    steps = [
        s.format(a=a, b=b, m=rng.choice([5, 10, 15, 20, 30]))
        for s in rng.sample(COOK_STEPS, rng.randint(4, 8))
    ]
    sentences = [f"Here is a simple recipe for {dish}. You will need {', '.join(ingredients)}."]
    sentences += [f"Step {i}: {step}" for i, step in enumerate(steps, 1)]
    sentences += [rng.choice(COOK_TIPS).format(a=a), f"Enjoy your {dish}!"]
    return question, _fit(sentences, rng)


def _programming(rng: random.Random) -> tuple[str, str]:
    language = rng.choice(sorted(LANGUAGES))
    task = rng.choice(sorted(CODE_TASKS))
    library, construct = LANGUAGES[language]
    question = rng.choice(
        [
            f"How do I {task} in {language}?",
            f"What is the best way to {task} in {language}?",
            f"Can you show me how to {task} using {language}?",
            f"I am learning {language}. How can I {task}?",
        ]
    )
    sentences = [
        f"In {language}, the simplest way to {task} is to {CODE_TASKS[task]}.",
        f"You can do this with {library}, and {construct} keep the code short.",
        "Put the logic in a small function that takes the input and returns the result.",
    ]
    sentences += rng.sample(CODE_NOTES, 6)
    sentences.append(f"That is all you need to {task} in {language}.")
    return question, _fit(sentences, rng)


def _travel(rng: random.Random) -> tuple[str, str]:
    city = rng.choice(sorted(CITIES))
    country, season, sights = CITIES[city]
    days = rng.randint(2, 7)
    question = rng.choice(
        [
            f"What should I see in {city}?",
            f"I am visiting {city} for {days} days. Any advice?",
            f"When is the best time to visit {city}?",
            f"Is {city} a good place for a holiday?",
        ]
    )
    sentences = [
        f"{city} in {country} is a great destination, and the best time to go is {season}.",
        f"Do not miss {sights}.",
    ]
    sentences += rng.sample(TRAVEL_TIPS, 7)
    sentences.append(f"Have a wonderful trip to {city}!")
    return question, _fit(sentences, rng)


def _science(rng: random.Random) -> tuple[str, str]:
    concept = rng.choice(sorted(CONCEPTS))
    definition, detail = CONCEPTS[concept]
    question = rng.choice(
        [
            f"What is {concept}?",
            f"Can you explain {concept} in simple words?",
            f"How does {concept} work?",
            f"Why is {concept} important?",
        ]
    )
    sentences = [f"In short, {concept} is {definition}.", detail]
    sentences += rng.sample(SCIENCE_EXTRA, 8)
    sentences.append(f"I hope this helps you understand {concept}.")
    return question, _fit(sentences, rng)


def _history(rng: random.Random) -> tuple[str, str]:
    event = rng.choice(sorted(EVENTS))
    when, who, result = EVENTS[event]
    question = rng.choice(
        [
            f"What happened during {event}?",
            f"Why was {event} important?",
            f"When did {event} take place?",
            f"Can you tell me about {event}?",
        ]
    )
    sentences = [
        f"{event[0].upper() + event[1:]} took place {when}.",
        f"The key figures were {who}, and as a result {result}.",
    ]
    sentences += rng.sample(HISTORY_EXTRA, 8)
    sentences.append(f"That is a short summary of {event}.")
    return question, _fit(sentences, rng)


TOPICS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "cooking": _cooking,
    "programming": _programming,
    "travel": _travel,
    "science": _science,
    "history": _history,
}
FOLLOW_UPS = ["Thanks! And another one:", "Great, thank you.", "That helps.", "One more question."]


def generate_conversations(n: int = 400, seed: int = 0) -> list[list[dict]]:
    """`n` conversations of 1 to 3 user/assistant turns, each on one topic, as herd.chat messages."""
    rng = random.Random(seed)
    conversations: list[list[dict]] = []
    seen: set[str] = set()
    while len(conversations) < n:
        topic = TOPICS[rng.choice(sorted(TOPICS))]
        messages: list[dict] = []
        for turn in range(rng.choice([1, 1, 2, 3])):
            question, answer = topic(rng)
            if turn > 0 and rng.random() < 0.5:
                question = f"{rng.choice(FOLLOW_UPS)} {question}"
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        # Short one-turn rows can repeat; skip repeats so a train/eval split never shares a row.
        key = messages_to_guanaco(messages)
        if key not in seen:
            seen.add(key)
            conversations.append(messages)
    return conversations


def generate_guanaco_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Rows `{"text": "### Human: ... ### Assistant: ..."}` in the openassistant-guanaco format."""
    return [{"text": messages_to_guanaco(messages)} for messages in generate_conversations(n, seed)]


def generate_llama2_rows(n: int = 200, seed: int = 0, system_fraction: float = 0.3) -> list[dict]:
    """The same conversations as generate_guanaco_rows, rendered in the Llama-2 chat format.

    About `system_fraction` of them start with a system prompt.
    """
    # A separate stream for the system prompts keeps the conversations identical to the guanaco rows.
    rng = random.Random(f"system-{seed}")
    rows = []
    for messages in generate_conversations(n, seed):
        if rng.random() < system_fraction:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
        rows.append({"text": format_llama2(messages).text})
    return rows


def write_sample(path: str | Path, n: int = 400, seed: int = 0, fmt: str = "guanaco") -> Path:
    """Write rows as JSON lines to `path` (fmt "guanaco" or "llama2") and return the path."""
    generate = {"guanaco": generate_guanaco_rows, "llama2": generate_llama2_rows}[fmt]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in generate(n, seed):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .jsonl path")
    parser.add_argument("--n", type=int, default=400, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=["guanaco", "llama2"], default="guanaco")
    args = parser.parse_args(argv)
    print(write_sample(args.out, n=args.n, seed=args.seed, fmt=args.fmt))


if __name__ == "__main__":
    main()
