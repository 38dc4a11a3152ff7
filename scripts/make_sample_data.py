"""Write rlhf_cli/assets/sample_dolly.jsonl: a small, seeded, learnable instruction dataset in Dolly format.

Every row is generated from a template or a curated table whose answer is correct by construction, so a tiny
model can actually learn the tasks and a human can check any row. Same seed -> byte-identical file.

    python scripts/make_sample_data.py                      # rewrites the shipped file
    python scripts/make_sample_data.py --out /tmp/x.jsonl --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO))

# The word list is shared with the PPO word-order task, whose prompts and gold reward parse these rows' phrasings.
from rlhf_cli.tasks.word_order import WORDS  # noqa: E402

DEFAULT_OUT = REPO / "rlhf_cli" / "assets" / "sample_dolly.jsonl"
DEFAULT_SEED = 0

# (instruction, context, response); the category is attached per family in FAMILIES.
Row = tuple[str, str, str]

NAMES = [
    "Tom",
    "Maria",
    "Ali",
    "Priya",
    "Ken",
    "Lena",
    "Omar",
    "Sofia",
    "Jack",
    "Mei",
    "Ravi",
    "Emma",
    "Noah",
    "Aisha",
    "Lucas",
    "Yuki",
    "Nina",
    "Pedro",
    "Hana",
    "Sam",
]
ITEMS = [
    "apples",
    "pencils",
    "marbles",
    "books",
    "cookies",
    "stickers",
    "oranges",
    "cards",
    "coins",
    "flowers",
    "shells",
    "stamps",
]
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Vietnam", "Hanoi"),
    ("Morocco", "Rabat"),
    ("Ghana", "Accra"),
    ("Turkey", "Ankara"),
    ("Cuba", "Havana"),
    ("Colombia", "Bogota"),
    ("Belgium", "Brussels"),
]
# (unit, plural, target unit plural, factor): every conversion is an exact integer multiplication.
UNITS = [
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("kilogram", "kilograms", "grams", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("liter", "liters", "milliliters", 1000),
    ("centimeter", "centimeters", "millimeters", 10),
    ("year", "years", "months", 12),
]
# Directed pairs: only directions whose answer is unambiguous (no "old" -> "new"/"young").
ANTONYMS = [
    ("hot", "cold"),
    ("cold", "hot"),
    ("fast", "slow"),
    ("slow", "fast"),
    ("up", "down"),
    ("down", "up"),
    ("happy", "sad"),
    ("sad", "happy"),
    ("dark", "light"),
    ("early", "late"),
    ("late", "early"),
    ("full", "empty"),
    ("empty", "full"),
    ("young", "old"),
    ("wet", "dry"),
    ("dry", "wet"),
    ("hard", "soft"),
    ("soft", "hard"),
    ("loud", "quiet"),
    ("strong", "weak"),
    ("weak", "strong"),
    ("rich", "poor"),
    ("poor", "rich"),
    ("clean", "dirty"),
    ("dirty", "clean"),
    ("first", "last"),
    ("inside", "outside"),
    ("push", "pull"),
    ("pull", "push"),
    ("above", "below"),
    ("thick", "thin"),
    ("true", "false"),
    ("false", "true"),
    ("day", "night"),
    ("night", "day"),
    ("open", "closed"),
]
PLURALS = [
    ("mouse", "mice"),
    ("child", "children"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("goose", "geese"),
    ("person", "people"),
    ("box", "boxes"),
    ("bus", "buses"),
    ("city", "cities"),
    ("baby", "babies"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("wolf", "wolves"),
    ("potato", "potatoes"),
    ("sheep", "sheep"),
    ("deer", "deer"),
    ("cat", "cats"),
    ("church", "churches"),
    ("dish", "dishes"),
    ("story", "stories"),
    ("half", "halves"),
    ("ox", "oxen"),
    ("glass", "glasses"),
    ("key", "keys"),
    ("toy", "toys"),
    ("fish", "fish"),
]
JOBS = [
    "a teacher",
    "an engineer",
    "a nurse",
    "a baker",
    "a pilot",
    "a farmer",
    "an artist",
    "a doctor",
    "a librarian",
    "a gardener",
    "a chef",
    "a carpenter",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Seoul",
    "Dublin",
    "Cairo",
    "Vienna",
    "Hanoi",
    "Accra",
    "Athens",
    "Madrid",
    "Toronto",
    "Osaka",
    "Chicago",
    "Melbourne",
]
HOBBIES = [
    "painting",
    "hiking",
    "chess",
    "swimming",
    "baking bread",
    "playing the guitar",
    "reading novels",
    "cycling",
    "bird watching",
    "gardening",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
FRUITS = ["apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "lemon", "kiwi"]
VEGETABLES = ["carrot", "potato", "onion", "cabbage", "spinach", "broccoli", "lettuce", "celery", "leek", "radish"]
ANIMALS = {
    "mammal": ["dog", "horse", "cow", "dolphin", "whale", "bat", "lion", "elephant", "rabbit"],
    "bird": ["eagle", "sparrow", "penguin", "owl", "parrot", "duck", "robin"],
    "fish": ["salmon", "trout", "shark", "tuna", "cod", "goldfish"],
}
BRAINSTORM = {
    "fruits": FRUITS,
    "vegetables": VEGETABLES,
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "musical instruments": ["piano", "violin", "guitar", "flute", "drum", "trumpet", "cello"],
    "sports played with a ball": ["football", "tennis", "basketball", "volleyball", "golf", "cricket", "baseball"],
    "school subjects": ["mathematics", "history", "biology", "geography", "music", "chemistry", "art"],
    "things found in a kitchen": ["a spoon", "a kettle", "a frying pan", "a fridge", "a cutting board", "an oven"],
    "sea animals": ["octopus", "dolphin", "crab", "jellyfish", "seal", "starfish"],
    "ways to save water": [
        "take shorter showers",
        "fix dripping taps",
        "turn off the tap while brushing your teeth",
        "water plants in the evening",
        "run the washing machine only when it is full",
    ],
}
OPEN_QA = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit."),
    ("At what temperature does water boil at sea level?", "At sea level water boils at 100 degrees Celsius."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What does a caterpillar turn into?", "A caterpillar turns into a butterfly or a moth."),
    ("Why do we need to drink water?", "Our bodies use water to stay cool, carry nutrients and remove waste."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than other colors, so the sky looks blue."),
    ("What causes day and night?", "The Earth spins on its axis, so each side faces the Sun for part of the time."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the tallest mountain above sea level?", "Mount Everest is the tallest mountain above sea level."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("Which instrument has black and white keys?", "The piano has black and white keys."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is a noun?", "A noun is a word that names a person, a place or a thing."),
    ("What is a verb?", "A verb is a word for an action or a state, such as run or be."),
    ("What is photosynthesis?", "Photosynthesis is how plants make food from sunlight, water and carbon dioxide."),
    ("How can I sleep better?", "Go to bed at the same time each night and avoid screens for an hour before sleep."),
    (
        "What is a good way to start learning to cook?",
        "Start with a few simple recipes and cook them until they feel easy.",
    ),
    ("Why should I warm up before exercise?", "Warming up raises your heart rate slowly and helps prevent injuries."),
    ("What is the closest star to the Earth?", "The Sun is the closest star to the Earth."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
]
SENTENCES = [
    ("river", "We had a quiet picnic beside the river."),
    ("lantern", "She lit a lantern to read in the tent."),
    ("garden", "Tomatoes grow well in our sunny garden."),
    ("journey", "The train journey took four hours."),
    ("whisper", "He spoke in a whisper so the baby would not wake."),
    ("breeze", "A cool breeze came in through the open window."),
    ("library", "I borrowed two books from the library."),
    ("mountain", "They climbed the mountain at dawn."),
    ("puzzle", "The children finished the puzzle together."),
    ("rainbow", "A rainbow appeared after the storm."),
    ("kitchen", "The kitchen smelled of fresh bread."),
    ("ocean", "The ocean was calm and blue this morning."),
]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def times(n: int) -> str:
    return "1 time" if n == 1 else f"{n} times"


def arithmetic(r: random.Random) -> Row:
    name, item, kind = r.choice(NAMES), r.choice(ITEMS), r.randrange(5)
    a, b = r.randint(2, 12), r.randint(2, 12)
    if kind == 0:
        return (
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "",
            f"{a} + {b} = {a + b}, so {name} has {a + b} {item} now.",
        )
    if kind == 1:
        a = a + b + r.randint(2, 9)
        return (
            f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?",
            "",
            f"{a} - {b} = {a - b}, so {name} has {a - b} {item} left.",
        )
    if kind == 2:
        return (
            f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?",
            "",
            f"{a} x {b} = {a * b}, so there are {a * b} {item} in total.",
        )
    if kind == 3:
        return (
            f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?",
            "",
            f"{a * b} / {a} = {b}, so each friend gets {b} {item}.",
        )
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."


def number_sequence(r: random.Random) -> Row:
    start, step = r.randint(1, 20), r.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    return (
        f"What number comes next: {', '.join(map(str, seq))}?",
        "",
        f"The next number is {seq[-1] + step}, because each number is {step} more than the one before.",
    )


def reverse_words(r: random.Random) -> Row:
    words = r.sample(WORDS, r.randint(3, 5))
    if r.random() < 0.5:
        return f"Reverse the order of these words: {', '.join(words)}.", "", ", ".join(reversed(words))
    return "Write the words in the list in reverse order.", ", ".join(words), ", ".join(reversed(words))


def sort_words(r: random.Random) -> Row:
    words = r.sample(WORDS, r.randint(3, 5))
    if r.random() < 0.5:
        return f"Sort these words alphabetically: {', '.join(words)}.", "", ", ".join(sorted(words))
    return "Put the words in the list in alphabetical order.", ", ".join(words), ", ".join(sorted(words))


def capital_table(r: random.Random) -> Row:
    rows = r.sample(CAPITALS, 4)
    table = "Country | Capital\n" + "\n".join(f"{c} | {k}" for c, k in rows)
    country, capital = r.choice(rows)
    if r.random() < 0.5:
        return f"Using the table, what is the capital of {country}?", table, f"The capital of {country} is {capital}."
    return (
        f"Which country in the table has {capital} as its capital?",
        table,
        f"{country} has {capital} as its capital.",
    )


def capital_open(r: random.Random) -> Row:
    country, capital = r.choice(CAPITALS)
    return f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."


def unit_conversion(r: random.Random) -> Row:
    unit, units, target, factor = r.choice(UNITS)
    n = r.randint(1, 12)
    src = unit if n == 1 else units
    return (
        f"How many {target} are in {n} {src}?",
        "",
        f"There are {factor} {target} in one {unit}, so {n} {src} is {n * factor} {target}.",
    )


def antonym(r: random.Random) -> Row:
    word, opposite = r.choice(ANTONYMS)
    q = r.choice(["What is the opposite of '{w}'?", "Give an antonym of the word '{w}'."]).format(w=word)
    return q, "", f"The opposite of '{word}' is '{opposite}'."


def plural(r: random.Random) -> Row:
    word, many = r.choice(PLURALS)
    return f"What is the plural of '{word}'?", "", f"The plural of '{word}' is '{many}'."


def letter_count(r: random.Random) -> Row:
    word = r.choice(WORDS)
    if r.random() < 0.4:
        return f"How many letters are in the word '{word}'?", "", f"The word '{word}' has {len(word)} letters."
    letter = r.choice(sorted(set(word)))
    return (
        f"How many times does the letter '{letter}' appear in the word '{word}'?",
        "",
        f"The letter '{letter}' appears {times(word.count(letter))} in '{word}'.",
    )


def extraction(r: random.Random) -> Row:
    name, job, city, hobby = r.choice(NAMES), r.choice(JOBS), r.choice(CITIES), r.choice(HOBBIES)
    year = r.randint(1950, 2005)
    context = f"{name} was born in {year} in {city}. {name} works as {job} and enjoys {hobby} at the weekend."
    questions = [
        (f"Where was {name} born?", f"{name} was born in {city}."),
        (f"In which year was {name} born?", f"{name} was born in {year}."),
        (f"What is {name}'s job?", f"{name} works as {job}."),
        (f"What does {name} enjoy at the weekend?", f"{name} enjoys {hobby} at the weekend."),
    ]
    q, a = r.choice(questions)
    return q, context, a


def summarization(r: random.Random) -> Row:
    city, kind = r.choice(CITIES), r.randrange(3)
    instruction = r.choice(["Summarize this passage in one sentence.", "Give a one-sentence summary of the text."])
    if kind == 0:
        year, books, day = r.randint(1900, 2010), r.randint(5, 90) * 1000, r.choice(DAYS)
        ctx = f"The {city} City Library opened in {year}. It holds {books} books. It is open every day except {day}."
        return (
            instruction,
            ctx,
            (f"The {city} City Library, opened in {year}, holds {books} books and is open every day except {day}."),
        )
    if kind == 1:
        day, a, b = r.choice(DAYS), r.randint(2, 6), r.randint(0, 1)
        home, away = r.sample(["Lions", "Hawks", "Bears", "Foxes", "Wolves", "Eagles"], 2)
        ctx = f"On {day}, the {home} played the {away} in {city}. The {home} won the match {a} to {b}."
        return instruction, ctx, f"The {home} beat the {away} {a} to {b} in {city} on {day}."
    temp, day = r.randint(12, 34), r.choice(DAYS[:6])
    nxt = DAYS[DAYS.index(day) + 1]
    ctx = f"On {day} it was sunny in {city}. The temperature reached {temp} degrees Celsius. Rain is expected on {nxt}."
    return instruction, ctx, f"{city} was sunny on {day} at {temp} degrees Celsius, with rain expected on {nxt}."


def classification(r: random.Random) -> Row:
    kind = r.randrange(3)
    if kind == 0:
        n = r.randint(1, 200)
        return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."
    if kind == 1:
        group, item = r.choice([("fruit", f) for f in FRUITS] + [("vegetable", v) for v in VEGETABLES])
        return f"Is a {item} a fruit or a vegetable?", "", f"A {item} is a {group}."
    group = r.choice(sorted(ANIMALS))
    animal = r.choice(ANIMALS[group])
    return f"Is a {animal} a mammal, a bird or a fish?", "", f"A {animal} is a {group}."


def compare_numbers(r: random.Random) -> Row:
    a, b = r.sample(range(1, 500), 2)
    if r.random() < 0.5:
        return f"Which number is larger, {a} or {b}?", "", f"{max(a, b)} is larger than {min(a, b)}."
    return f"Which number is smaller, {a} or {b}?", "", f"{min(a, b)} is smaller than {max(a, b)}."


def brainstorm(r: random.Random) -> Row:
    topic = r.choice(sorted(BRAINSTORM))
    n = r.choice(sorted(NUMBER_WORDS))
    picks = r.sample(BRAINSTORM[topic], n)
    listed = ", ".join(picks[:-1]) + " and " + picks[-1]
    return f"Name {NUMBER_WORDS[n]} {topic}.", "", f"Here are {NUMBER_WORDS[n]} {topic}: {listed}."


def open_qa(r: random.Random) -> Row:
    q, a = r.choice(OPEN_QA)
    return q, "", a


def creative(r: random.Random) -> Row:
    word, sentence = r.choice(SENTENCES)
    return f"Write a short sentence using the word '{word}'.", "", sentence


def next_in_calendar(r: random.Random) -> Row:
    names, what = r.choice([(DAYS, "day"), (MONTHS, "month")])
    i = r.randrange(len(names))
    if r.random() < 0.5:
        after = names[(i + 1) % len(names)]
        return f"Which {what} comes after {names[i]}?", "", f"{after} comes after {names[i]}."
    before = names[i - 1]
    return f"Which {what} comes before {names[i]}?", "", f"{before} comes before {names[i]}."


# (generator, Dolly category, rows). Quotas sum to 400; curated families stay below their table sizes.
FAMILIES: list[tuple[Callable[[random.Random], Row], str, int]] = [
    (arithmetic, "general_qa", 40),
    (number_sequence, "general_qa", 15),
    (reverse_words, "general_qa", 25),
    (sort_words, "general_qa", 25),
    (capital_table, "closed_qa", 30),
    (capital_open, "open_qa", 15),
    (unit_conversion, "general_qa", 25),
    (antonym, "open_qa", 20),
    (plural, "open_qa", 20),
    (letter_count, "general_qa", 25),
    (extraction, "information_extraction", 25),
    (summarization, "summarization", 25),
    (classification, "classification", 25),
    (compare_numbers, "classification", 15),
    (brainstorm, "brainstorming", 20),
    (open_qa, "open_qa", 25),
    (creative, "creative_writing", 10),
    (next_in_calendar, "open_qa", 15),
]
TOTAL_ROWS = 400


def build_rows(seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Generate TOTAL_ROWS unique rows (unique by instruction + context), shuffled so families interleave."""
    assert sum(n for _, _, n in FAMILIES) == TOTAL_ROWS
    r = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows: list[dict[str, str]] = []
    for make, category, quota in FAMILIES:
        made, tries = 0, 0
        while made < quota:
            tries += 1
            if tries > 100 * quota:  # a table too small for its quota is a bug in this script
                raise RuntimeError(f"{make.__name__}: only {made} unique rows of {quota}")
            instruction, context, response = make(r)
            if (instruction, context) in seen:
                continue
            seen.add((instruction, context))
            rows.append({"instruction": instruction, "context": context, "response": response, "category": category})
            made += 1
    r.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict[str, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_jsonl(build_rows(args.seed), args.out)
    print(f"wrote {TOTAL_ROWS} rows to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
