"""Build the sets `lorakit eval --retention` ships: general text for the drift figures, probes for kept knowledge.

Writes ``src/lorakit/retention_data/general.jsonl``, ``probes.jsonl`` and ``LICENSE-PSF.txt``; deterministic (the
same Python release gives the same files). Needs no network and nothing but the Python standard library:

    python scripts/build_retention_set.py                       # into src/lorakit/retention_data
    python scripts/build_retention_set.py --out /tmp/retention  # elsewhere, to compare

General text: prose paragraphs of the Python documentation's reference topics, as every CPython installation ships
them for ``help()`` (``pydoc_data.topics``; Python Software Foundation License Version 2, which allows copying with
its notice kept: the notice and licence are written beside the data). Code samples, grammar rules, tables and
headings are left out; neighbouring paragraphs of one topic are joined into passages of 400 to 900 characters, and
``--passages`` of them are kept, evenly spaced over all topics.

Probes: the short multiple-choice questions below, written for lorakit (no source text, so no licence but
lorakit's own): capitals and geography, science, arithmetic (some generated from a fixed seed), units and time,
common sense, history and culture, language. Each line: ``question | right answer | wrong answer | ...``; the
choices are shuffled with a fixed seed per question, so the right one is not always first.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "lorakit" / "retention_data"
MIN_CHARS, MAX_CHARS = 400, 900

PROBES = {
    "capitals": [
        f"What is the capital of {line}"
        for line in """France? | Paris | Lyon | Marseille | Nice
Japan? | Tokyo | Osaka | Kyoto | Nagoya
Italy? | Rome | Milan | Naples | Venice
Germany? | Berlin | Munich | Hamburg | Frankfurt
Spain? | Madrid | Barcelona | Seville | Valencia
Egypt? | Cairo | Alexandria | Luxor | Giza
Russia? | Moscow | Saint Petersburg | Kazan | Novosibirsk
the United Kingdom? | London | Manchester | Liverpool | Birmingham
Canada? | Ottawa | Toronto | Vancouver | Montreal
Australia? | Canberra | Sydney | Melbourne | Perth
China? | Beijing | Shanghai | Hong Kong | Guangzhou
India? | New Delhi | Mumbai | Kolkata | Bangalore
Mexico? | Mexico City | Guadalajara | Monterrey | Cancun
Argentina? | Buenos Aires | Cordoba | Rosario | Mendoza
Kenya? | Nairobi | Mombasa | Kisumu | Nakuru
Greece? | Athens | Thessaloniki | Patras | Sparta
Portugal? | Lisbon | Porto | Braga | Faro
Ireland? | Dublin | Cork | Galway | Limerick
Norway? | Oslo | Bergen | Trondheim | Stavanger
Sweden? | Stockholm | Gothenburg | Malmo | Uppsala
Poland? | Warsaw | Krakow | Gdansk | Wroclaw
Austria? | Vienna | Salzburg | Graz | Innsbruck
the Netherlands? | Amsterdam | Rotterdam | Utrecht | Eindhoven
Turkey? | Ankara | Istanbul | Izmir | Antalya
South Korea? | Seoul | Busan | Incheon | Daegu
Thailand? | Bangkok | Phuket | Chiang Mai | Pattaya
Peru? | Lima | Cusco | Arequipa | Trujillo
Cuba? | Havana | Santiago de Cuba | Varadero | Holguin
Finland? | Helsinki | Tampere | Turku | Oulu
the United States? | Washington, D.C. | New York | Los Angeles | Chicago
Brazil? | Brasilia | Rio de Janeiro | Sao Paulo | Salvador
Switzerland? | Bern | Zurich | Geneva | Basel
Belgium? | Brussels | Antwerp | Ghent | Bruges
Denmark? | Copenhagen | Aarhus | Odense | Aalborg
Nigeria? | Abuja | Lagos | Kano | Ibadan
Morocco? | Rabat | Casablanca | Marrakesh | Fez
Vietnam? | Hanoi | Ho Chi Minh City | Da Nang | Hue
Chile? | Santiago | Valparaiso | Concepcion | Antofagasta
New Zealand? | Wellington | Auckland | Christchurch | Queenstown
Scotland? | Edinburgh | Glasgow | Aberdeen | Dundee""".splitlines()
    ],
    "geography": """Which is the largest ocean on Earth? | the Pacific Ocean | the Atlantic Ocean | the Indian Ocean | the Arctic Ocean
Which is the largest continent? | Asia | Europe | Africa | Australia
How many continents are there? | seven | five | nine | three
On which continent is Kenya? | Africa | Asia | Europe | South America
On which continent is Brazil? | South America | Africa | Europe | Asia
In which mountain range is Mount Everest? | the Himalayas | the Alps | the Andes | the Rockies
What is the Sahara? | a desert | a forest | a lake | a mountain
Which country is shaped like a boot? | Italy | France | Spain | Greece
Which river flows through Cairo? | the Nile | the Amazon | the Danube | the Thames
Which river flows through London? | the Thames | the Seine | the Rhine | the Nile
Which river flows through Paris? | the Seine | the Thames | the Danube | the Volga
Which ocean lies between Europe and North America? | the Atlantic Ocean | the Pacific Ocean | the Indian Ocean
In which country do kangaroos live in the wild? | Australia | Canada | Norway | Argentina
What is the largest country by area? | Russia | Canada | China | Brazil
Which is the longest river in South America? | the Amazon | the Nile | the Mississippi | the Danube
In which country is the city of Kyoto? | Japan | China | Korea | Thailand
In which country is Barcelona? | Spain | Italy | Portugal | France
In which country is Munich? | Germany | Austria | Switzerland | Poland
In which country is Toronto? | Canada | the United States | Australia | England
Which is the coldest continent? | Antarctica | Europe | Asia | Africa
Which of these countries lies partly in Europe and partly in Asia? | Turkey | Spain | Japan | Egypt
What is Greenland? | an island | a desert | a city | a river
Which line divides the Earth into the Northern and Southern Hemispheres? | the equator | the prime meridian | the Tropic of Cancer | the Arctic Circle
What is the official language of Brazil? | Portuguese | Spanish | French | English
What is the main language spoken in Mexico? | Spanish | Portuguese | French | Italian
What is the currency of Japan? | the yen | the euro | the dollar | the rupee
What is the currency of the United Kingdom? | the pound | the euro | the yen | the franc
Which currency is used in Germany? | the euro | the pound | the yen | the dollar""".splitlines(),
    "science": """At how many degrees Celsius does water boil at sea level? | one hundred | fifty | zero | two hundred
At how many degrees Celsius does water freeze? | zero | ten | fifty | one hundred
What is the chemical formula of water? | H2O | CO2 | O2 | NaCl
Which planet is closest to the Sun? | Mercury | Venus | Mars | Jupiter
Which is the largest planet in the Solar System? | Jupiter | Earth | Mars | Venus
Which planet is known as the Red Planet? | Mars | Venus | Saturn | Neptune
Which planet is famous for its bright rings? | Saturn | Mars | Mercury | Venus
What does the Earth orbit? | the Sun | the Moon | Mars | Jupiter
What is the Earth's natural satellite? | the Moon | the Sun | Mars | Venus
Which gas do plants take from the air for photosynthesis? | carbon dioxide | oxygen | helium | nitrogen
Which gas do humans need to breathe in to live? | oxygen | carbon dioxide | helium | hydrogen
How many legs does a spider have? | eight | six | four | ten
How many legs does an insect have? | six | eight | four | ten
What is the hardest natural substance? | diamond | gold | iron | wood
Which organ pumps blood through the body? | the heart | the lungs | the liver | the stomach
Which organs do humans breathe with? | the lungs | the heart | the kidneys | the stomach
Which organ do we think with? | the brain | the heart | the liver | the lungs
Which travels faster, light or sound? | light | sound
What is the chemical symbol for gold? | Au | Ag | Fe | Go
What is the chemical symbol for iron? | Fe | Ir | In | Au
What is the chemical symbol for oxygen? | O | H | N | C
What is the chemical symbol for sodium? | Na | So | Sd | S
Is a whale a mammal or a fish? | a mammal | a fish
Is a penguin a bird or a mammal? | a bird | a mammal
Is a bat a mammal or a bird? | a mammal | a bird
Is a frog an amphibian or a reptile? | an amphibian | a reptile
Is a shark a fish or a mammal? | a fish | a mammal
What is the unit of electrical resistance? | the ohm | the volt | the watt | the ampere
What is the SI unit of force? | the newton | the joule | the watt | the pascal
What is the SI unit of energy? | the joule | the newton | the volt | the metre
What is ice? | frozen water | melted rock | hot air | liquid sand
What is steam? | water vapour | frozen water | liquid metal | dry sand
Which of these materials does a magnet attract? | iron | wood | glass | paper
What kind of object is the Sun? | a star | a planet | a moon | a comet
What electric charge does an electron have? | negative | positive | neutral
What is the smallest prime number? | 2 | 1 | 3 | 0
Which force keeps us on the ground? | gravity | magnetism | friction | wind
What do plants need from the Sun to grow? | light | noise | cold | darkness
Which part of a plant takes up water from the soil? | the roots | the flowers | the leaves | the seeds
What do caterpillars turn into? | butterflies | spiders | frogs | bees
What do tadpoles grow into? | frogs | fish | snakes | birds
Which animal is the largest mammal? | the blue whale | the elephant | the giraffe | the hippopotamus
What is the fastest land animal? | the cheetah | the lion | the horse | the elephant
How many bones does an adult human have? | 206 | 106 | 306 | 156
What is the centre of an atom called? | the nucleus | the electron | the shell | the orbit
What is H2O commonly called? | water | salt | sugar | air
What is sodium chloride commonly called? | salt | sugar | chalk | soap
What colour is chlorophyll? | green | red | blue | yellow
Which vitamin does the skin make in sunlight? | vitamin D | vitamin C | vitamin A | vitamin K""".splitlines(),
    "arithmetic": """If you have three apples and eat one, how many apples are left? | two | three | four | one
A week has seven days. How many days are in two weeks? | fourteen | twelve | nine | twenty
How many sides does a triangle have? | three | four | five | six
How many sides does a square have? | four | three | five | six
How many sides does a hexagon have? | six | five | eight | seven
How many sides does an octagon have? | eight | six | seven | ten
What is half of ten? | five | two | four | twenty
What is double six? | twelve | eight | ten | sixteen
Which number is larger, 9 or 12? | 12 | 9
Which number is smaller, 15 or 51? | 15 | 51
Is 7 an odd or an even number? | odd | even
Is 10 an odd or an even number? | even | odd
What number comes after 99? | 100 | 98 | 101 | 90""".splitlines(),
    "units and time": """How many centimetres are in a metre? | 100 | 10 | 1000 | 12
How many grams are in a kilogram? | 1000 | 100 | 10 | 500
How many minutes are in an hour? | 60 | 30 | 100 | 24
How many seconds are in a minute? | 60 | 100 | 30 | 12
How many hours are in a day? | 24 | 12 | 60 | 48
How many days are in a week? | 7 | 5 | 10 | 6
How many months are in a year? | 12 | 10 | 6 | 24
How many days are in a leap year? | 366 | 365 | 364 | 360
How many items are in a dozen? | 12 | 10 | 6 | 20
How many years are in a century? | 100 | 10 | 1000 | 50
How many years are in a decade? | 10 | 100 | 5 | 12
How many degrees are in a right angle? | 90 | 180 | 45 | 360
What do the angles of a triangle add up to, in degrees? | 180 | 90 | 360 | 270
How many degrees are in a full circle? | 360 | 180 | 90 | 100
How many metres are in a kilometre? | 1000 | 100 | 10 | 10000
How many weeks are in a year? | 52 | 12 | 48 | 36
How many days are in the month of June? | 30 | 31 | 28 | 29
Which month has the fewest days? | February | January | March | December
What is the first month of the year? | January | March | December | June
Which day comes after Monday? | Tuesday | Sunday | Wednesday | Friday
Which day comes before Saturday? | Friday | Sunday | Thursday | Monday
Which month comes after March? | April | February | May | June
Which season comes after winter? | spring | summer | autumn
Which season is the coldest? | winter | summer | spring | autumn""".splitlines(),
    "common sense": """What do you use to cut paper? | scissors | a spoon | a pillow | a cup
Where do fish live? | in water | in trees | in the desert | in the sky
What colour is the sky on a clear day? | blue | green | purple | brown
What colour is grass? | green | blue | red | white
What colour are ripe bananas? | yellow | blue | purple | black
What colour is fresh snow? | white | black | green | red
What do bees make? | honey | milk | silk | wool
What do cows give that people drink? | milk | honey | juice | coffee
Which is heavier, a brick or a feather? | a brick | a feather
What do you wear to keep warm in winter? | a coat | sandals | a swimsuit | sunglasses
Where do people usually sleep? | in a bed | in a sink | in an oven | in a bathtub
What falls from clouds when it rains? | water | sand | leaves | stones
Is ice cream usually hot or cold? | cold | hot
Is fire hot or cold? | hot | cold
What do you see with? | your eyes | your ears | your nose | your feet
What do you hear with? | your ears | your eyes | your hands | your knees
What do you smell with? | your nose | your ears | your elbows | your eyes
What do you use to open a locked door? | a key | a spoon | a pencil | a sock
Where do you go to borrow books? | a library | a bakery | a garage | a stadium
Where does a surgeon usually work? | in a hospital | in a bakery | on a farm | in a library
Where do you buy fresh bread? | at a bakery | at a pharmacy | at a bank | at a library
What do you need to see in the dark? | a light | a spoon | a chair | a hat
What do you use to write on paper? | a pen | a fork | a plate | a shoe
What do you use to eat soup? | a spoon | a knife | a comb | a pencil
What is a baby dog called? | a puppy | a kitten | a calf | a foal
What is a baby cat called? | a kitten | a puppy | a lamb | a cub
What is a baby cow called? | a calf | a kitten | a chick | a foal
What is a baby sheep called? | a lamb | a calf | a puppy | a chick
Which animal barks? | a dog | a cat | a cow | a fish
Which animal says moo? | a cow | a dog | a duck | a cat
Which animal has a trunk? | an elephant | a horse | a rabbit | a tiger
Which animal has black and white stripes? | a zebra | a lion | an elephant | a bear
Which animal is known for its very long neck? | the giraffe | the mouse | the pig | the crocodile
Which of these animals can fly? | an eagle | a dog | a cow | a horse
Which of these is a fruit? | an apple | a carrot | a potato | an onion
Which of these is a vegetable? | a carrot | a banana | an apple | a grape
What do you need to bake a cake? | an oven | a freezer | a sink | a lamp
What do you do with a chair? | sit on it | eat it | wear it | drink it
What do you do with a book? | read it | eat it | wear it | plant it
What happens to ice when it gets warm? | it melts | it freezes | it burns | it grows
What falls from the sky as white flakes in winter? | snow | sand | ash | leaves
Where does the Sun rise? | in the east | in the west | in the north | in the south
Where does the Sun set? | in the west | in the east | in the north | in the south
When do people usually eat breakfast? | in the morning | at midnight | in the evening | at night
Which vehicle runs on rails? | a train | a car | a boat | a bicycle
Which of these vehicles flies? | an airplane | a bus | a bicycle | a ship
What do you use to call someone far away? | a telephone | a hammer | a broom | a kettle
What do you use to boil water for tea? | a kettle | a pillow | a book | a shoe""".splitlines(),
    "history and culture": """Who wrote Romeo and Juliet? | William Shakespeare | Charles Dickens | Jane Austen | Mark Twain
Who painted the Mona Lisa? | Leonardo da Vinci | Vincent van Gogh | Pablo Picasso | Claude Monet
Who was the first person to walk on the Moon? | Neil Armstrong | Yuri Gagarin | Buzz Aldrin | John Glenn
In which year did the Second World War end? | 1945 | 1918 | 1939 | 1965
Who developed the theory of relativity? | Albert Einstein | Isaac Newton | Charles Darwin | Galileo Galilei
Who formulated the laws of motion and universal gravitation? | Isaac Newton | Albert Einstein | Nikola Tesla | Marie Curie
Who proposed the theory of evolution by natural selection? | Charles Darwin | Isaac Newton | Albert Einstein | Louis Pasteur
In which country is the Great Wall? | China | Japan | India | Egypt
In which country are the pyramids of Giza? | Egypt | Mexico | Greece | India
In which city is the Eiffel Tower? | Paris | London | Rome | Berlin
In which city is the Statue of Liberty? | New York | Paris | London | Boston
In which city is the Colosseum? | Rome | Athens | Paris | Madrid
In which city is Big Ben? | London | Paris | Dublin | New York
Where did the ancient Olympic Games begin? | Greece | Italy | Egypt | China
What was Beethoven? | a composer | a painter | a scientist | an explorer
What was Pablo Picasso? | a painter | a composer | a scientist | a king
Who is credited with inventing the telephone? | Alexander Graham Bell | Thomas Edison | Nikola Tesla | Henry Ford
In which year did Christopher Columbus first reach the Americas? | 1492 | 1776 | 1066 | 1812
In which year did the United States declare independence? | 1776 | 1492 | 1865 | 1914
In which year did the Titanic sink? | 1912 | 1812 | 1945 | 1969
In which year did the Berlin Wall fall? | 1989 | 1961 | 1945 | 2001
Which musical instrument has 88 keys? | the piano | the violin | the guitar | the flute
How many lines does a sonnet have? | fourteen | ten | twelve | twenty
Which chess piece must be protected to avoid losing the game? | the king | the queen | the rook | the pawn
Which sport is played at Wimbledon? | tennis | golf | cricket | rugby
How many players does a football (soccer) team have on the field? | eleven | nine | seven | fifteen
Who wrote the Odyssey? | Homer | Plato | Virgil | Sophocles
What did the Wright brothers build and fly in 1903? | an airplane | a telephone | a car | a radio
Who was the first President of the United States? | George Washington | Abraham Lincoln | Thomas Jefferson | John Adams
Which civilisation built Machu Picchu? | the Inca | the Romans | the Egyptians | the Vikings
Who discovered penicillin? | Alexander Fleming | Louis Pasteur | Marie Curie | Isaac Newton
Who was the first woman to win a Nobel Prize? | Marie Curie | Florence Nightingale | Ada Lovelace | Jane Austen
Which holiday is celebrated on December 25th? | Christmas | Halloween | Easter | Thanksgiving
Which holiday is celebrated on October 31st? | Halloween | Christmas | Easter | New Year""".splitlines(),
    "language": [
        *(
            f"What is the opposite of {line}"
            for line in """hot? | cold | warm | spicy | sunny
big? | small | large | huge | tall
up? | down | over | high | above
happy? | sad | glad | cheerful | funny
fast? | slow | quick | rapid | early
early? | late | soon | first | fast
open? | closed | wide | free | empty
light? | dark | bright | white | clear
young? | old | new | small | fresh
full? | empty | whole | heavy | round
wet? | dry | damp | cold | soft
tall? | short | high | long | big
rich? | poor | wealthy | happy | lucky
strong? | weak | powerful | heavy | tough
hard? | soft | difficult | firm | solid
loud? | quiet | noisy | sharp | clear
thick? | thin | wide | dense | heavy
win? | lose | gain | play | beat
buy? | sell | pay | get | shop
push? | pull | press | shove | lift
begin? | end | start | open | go
always? | never | often | sometimes | usually
inside? | outside | within | under | beside
first? | last | next | early | top""".splitlines()
        ),
        *(
            f"What is the plural of {line}"
            for line in """mouse? | mice | mouses | mousen | meese
child? | children | childs | childes | childrens
foot? | feet | foots | feets | footes
tooth? | teeth | tooths | teeths | toothes
woman? | women | womans | womens
man? | men | mans | mens
goose? | geese | gooses | geeses
sheep? | sheep | sheeps | sheepes
box? | boxes | boxs | boxen
city? | cities | citys | cityes
knife? | knives | knifes | knifs""".splitlines()
        ),
        *(
            f"What is the past tense of {line}"
            for line in """go? | went | goed | gone | going
eat? | ate | eated | eaten | eating
see? | saw | seed | seen | seeing
run? | ran | runned | running | runs
write? | wrote | writed | written | writing
buy? | bought | buyed | buys | buying
swim? | swam | swimmed | swum | swimming
think? | thought | thinked | thinking | thinks
take? | took | taked | taken | takes
bring? | brought | bringed | brang | brings""".splitlines()
        ),
        *"""Which word means the same as big? | large | tiny | thin | quiet
Which word means the same as small? | little | huge | tall | loud
Which word means the same as quick? | fast | slow | heavy | late
Which word means the same as begin? | start | finish | stop | close
Which word means the same as happy? | glad | angry | tired | sad
Which word means the same as reply? | answer | ask | forget | hide
Which of these words is a colour? | red | table | run | happy
Which of these words is a verb? | run | blue | table | happy
Which of these words is a noun? | table | quickly | blue | happy
Which of these words is an adjective? | happy | run | quickly | table
Which word rhymes with cat? | hat | dog | cup | pen
Which word rhymes with moon? | spoon | star | sun | night
Which word rhymes with tree? | bee | leaf | wood | bark
How many letters are in the word "cat"? | three | four | two | five
What is the first letter of the English alphabet? | A | B | Z | E
What is the last letter of the English alphabet? | Z | Y | X | A
Which of these letters is a vowel? | E | B | T | K
What does the French word "bonjour" mean in English? | hello | goodbye | thank you | please
What does the Spanish word "gracias" mean in English? | thank you | hello | goodbye | sorry
What does the German word "Hund" mean in English? | dog | cat | house | hand
What does the Spanish word "adios" mean in English? | goodbye | hello | please | yes
What does the French word "merci" mean in English? | thank you | hello | please | sorry
How does the proverb end: "An apple a day keeps the..."? | doctor away | teacher away | rain away | cat away
How does the proverb end: "The early bird catches the..."? | worm | fish | train | ball""".splitlines(),
    ],
}


def arithmetic_probes(seed: int = 7) -> list[str]:
    """Sums, differences, products and quotients of small numbers; wrong answers have as many digits as the right
    one where possible (a likelihood ranking should not be won by length)."""
    rng = random.Random(seed)
    lines = []
    for kind, count in (("plus", 12), ("minus", 8), ("times", 10), ("divided by", 5)):
        for _ in range(count):
            if kind == "plus":
                a, b = rng.randint(2, 49), rng.randint(2, 49)
                right = a + b
            elif kind == "minus":
                a = rng.randint(11, 60)
                b = rng.randint(2, a - 1)
                right = a - b
            elif kind == "times":
                a, b = rng.randint(2, 12), rng.randint(2, 9)
                right = a * b
            else:
                b, right = rng.randint(2, 9), rng.randint(2, 9)
                a = b * right
            wrong: list[int] = []
            for delta in rng.sample([-10, -2, -1, 1, 2, 10], 6):
                if len(wrong) < 3 and right + delta > 0 and right + delta not in wrong:
                    wrong.append(right + delta)
            lines.append(f"What is {a} {kind} {b}? | {right} | " + " | ".join(map(str, wrong)))
    return lines


def probe_rows() -> list[dict]:
    rows = []
    sets = dict(PROBES)
    sets["arithmetic"] = [*sets["arithmetic"], *arithmetic_probes()]
    for category, lines in sets.items():
        for number, line in enumerate(lines, 1):
            question, *choices = (part.strip() for part in line.split(" | "))
            if len(choices) < 2 or len(set(choices)) != len(choices):
                raise SystemExit(f"probe {category} {number}: {line!r} needs two or more different choices")
            right = choices[0]
            rng = random.Random(f"{category}-{number}")
            rng.shuffle(choices)
            key = f"{category.replace(' ', '-')}-{number:03d}"
            rows.append({"id": key, "category": category, "question": question, "choices": choices,
                         "answer": choices.index(right)})  # fmt: skip
    return rows


def prose_blocks(text: str) -> list[str]:
    """The prose paragraphs of a pydoc topic, each on one line: no headings, code, grammar, tables or lists."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith(("  ", "\t")) for line in lines):
            continue  # code, grammar rules, indented notes and lists
        if any(re.fullmatch(r"[*=\-+~^]{3,}", line.strip()) for line in lines):
            continue  # a heading with its underline
        flat = " ".join(block.split())
        letters = sum(c.isalpha() or c.isspace() for c in flat)
        if len(flat) < 120 or letters < 0.85 * len(flat) or ">>>" in flat or "::=" in flat or "|" in flat:
            continue
        kept.append(flat)
    return kept


def passages(topics: dict[str, str]) -> list[tuple[str, str]]:
    """(topic, passage) pairs: neighbouring prose paragraphs of one topic joined up to MAX_CHARS characters."""
    found = []
    for topic in sorted(topics):
        current = ""
        for block in prose_blocks(topics[topic]):
            if len(block) > MAX_CHARS:  # cut a long paragraph at its last sentence end that fits
                cut = block.rfind(". ", 0, MAX_CHARS)
                block = block[: cut + 1] if cut >= MIN_CHARS else ""
            if not block:
                continue
            if current and len(current) + 1 + len(block) > MAX_CHARS:
                if len(current) >= MIN_CHARS:
                    found.append((topic, current))
                current = ""
            current = f"{current} {block}".strip()
        if len(current) >= MIN_CHARS:
            found.append((topic, current))
    return found


def evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


def psf_licence() -> str:
    """The PSF License Agreement section of this Python's LICENSE file, or its name and address when absent."""
    candidates = [Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"]
    for path in candidates:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            start = text.find("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
            end = text.find("BEOPEN.COM LICENSE AGREEMENT", start)
            if start >= 0 and end > start:
                return text[start:end].rstrip() + "\n"
    return "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2: https://docs.python.org/3/license.html\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    parser.add_argument("--passages", type=int, default=180, help="general-text passages to keep (default 180)")
    args = parser.parse_args()
    from pydoc_data.topics import topics

    chosen = evenly(passages(topics), args.passages)
    version = ".".join(map(str, sys.version_info[:3]))
    general = [{"text": text, "source": f"Python {version} documentation, pydoc topic {t!r}"} for t, text in chosen]
    probes = probe_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "general.jsonl", general)
    write_jsonl(args.out / "probes.jsonl", probes)
    (args.out / "LICENSE-PSF.txt").write_text(psf_licence(), encoding="utf-8")
    chars = sum(len(row["text"]) for row in general)
    print(f"general.jsonl: {len(general)} passages, {chars:,} characters (Python {version} pydoc topics)")
    print(f"probes.jsonl: {len(probes)} questions in {len({p['category'] for p in probes})} categories")


if __name__ == "__main__":
    main()
