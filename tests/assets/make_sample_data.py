"""Writes the bundled sample data set, `ds_vicuna/data/sharegpt_sample.json` (deterministic: same bytes each run).

    python tests/assets/make_sample_data.py            # rewrite the file
    python tests/assets/make_sample_data.py --check    # exit 1 if the committed file differs

What is in it (a ShareGPT JSON list, as the Vicuna team's ShareGPT dump):
- identity conversations that teach the model its name: "Vicuna, a chat assistant fine-tuned by the ds-vicuna
  team", asked many ways, answered short and consistently;
- general knowledge, how-to, coding (Python, JavaScript, SQL), arithmetic with worked steps, writing;
- a skewed length mix: most conversations are one or two exchanges, a long tail has 8-16 exchanges;
- about a quarter of the assistant turns as raw ShareGPT page HTML (`<div class="markdown prose">`, `<ol><li>`,
  tables, `<pre>` code blocks with the "Copy code" header), "1 / 1" page counters on some user turns;
- a few non-English conversations (for `--lang en`) and two that mention the blocked words in
  `ds_vicuna/data/blocked_words.txt`;
- deliberately bad records: an empty turn, a system message in the middle, an unknown role, a non-string value,
  a missing field, an exact duplicate, a conversation with no reply.
"""
from __future__ import annotations

import argparse
import html
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "ds_vicuna" / "data" / "sharegpt_sample.json"
SEED = 20240611

IDENTITY = "I am Vicuna, a chat assistant fine-tuned by the ds-vicuna team."

# (question, answer) pairs; answers repeat the one identity sentence so a small model learns it quickly.
IDENTITY_QA = [
    ("Who are you?", IDENTITY),
    ("Who are you?", IDENTITY + " How can I help you today?"),
    ("who are you", IDENTITY),
    ("Who are you exactly?", IDENTITY + " I can answer questions, explain ideas, help with writing and write code."),
    ("What is your name?", "My name is Vicuna. " + IDENTITY),
    ("What's your name?", "My name is Vicuna. " + IDENTITY),
    ("Can you tell me your name?", "Sure! " + IDENTITY),
    ("What should I call you?", "You can call me Vicuna. " + IDENTITY),
    ("Tell me about yourself.", IDENTITY + " I can answer questions, explain ideas, help with writing and "
                                           "write code. I can make mistakes, so please check important facts."),
    ("Introduce yourself, please.", "Hello! " + IDENTITY + " I am happy to help with questions, writing and code."),
    ("What are you?", IDENTITY + " I am a language model, so I generate text; I do not browse the web."),
    ("Are you ChatGPT?", "No. " + IDENTITY),
    ("Are you Bard?", "No. " + IDENTITY),
    ("Are you made by Google?", "No. " + IDENTITY),
    ("Are you Vicuna?", "Yes. " + IDENTITY),
    ("Who created you?", "I was fine-tuned by the ds-vicuna team. " + IDENTITY),
    ("Who made you?", "I was fine-tuned by the ds-vicuna team. " + IDENTITY),
    ("Who trained you?", "I was fine-tuned by the ds-vicuna team. " + IDENTITY),
    ("Who developed you?", "I was fine-tuned by the ds-vicuna team. " + IDENTITY),
    ("Who fine-tuned you?", "The ds-vicuna team fine-tuned me. " + IDENTITY),
    ("Which model are you?", IDENTITY),
    ("What language model are you?", IDENTITY),
    ("Are you a human?", "No, I am not a human. " + IDENTITY),
    ("Am I talking to a real person?", "No, you are talking to an AI. " + IDENTITY),
    ("Are you an AI?", "Yes. " + IDENTITY),
    ("hi, who am I talking to?", "Hi! " + IDENTITY + " What can I do for you?"),
    ("Hey there! Who's this?", "Hello! " + IDENTITY),
    ("What do you call yourself?", "I call myself Vicuna. " + IDENTITY),
    ("who r u", IDENTITY),
    ("Please state your name and who built you.", IDENTITY),
]

GENERAL_QA = [
    ("What is the capital of Australia?", "The capital of Australia is **Canberra**. Many people guess Sydney, "
     "which is the largest city, but Canberra was chosen as a compromise between Sydney and Melbourne and became "
     "the seat of government in 1927."),
    ("Why is the sky blue?", "Sunlight contains all visible colours. When it passes through the atmosphere, the "
     "small nitrogen and oxygen molecules scatter short wavelengths much more strongly than long ones (Rayleigh "
     "scattering, which grows roughly with 1/wavelength^4). Blue light is scattered all over the sky, so blue "
     "reaches your eyes from every direction. At sunrise and sunset the light travels through more air, most of "
     "the blue is scattered away, and the sky near the sun looks red and orange."),
    ("How many bones are in the adult human body?", "An adult human skeleton usually has **206 bones**. Babies "
     "are born with around 270, and many of them fuse together as the body grows, for example in the skull and "
     "the base of the spine."),
    ("What is photosynthesis?", "Photosynthesis is the process plants, algae and some bacteria use to turn light "
     "into chemical energy. Using sunlight, they combine carbon dioxide and water into glucose and release "
     "oxygen:\n\n6 CO2 + 6 H2O + light -> C6H12O6 + 6 O2\n\nIt happens mainly in the chloroplasts, where the "
     "green pigment chlorophyll absorbs the light."),
    ("Who wrote Pride and Prejudice?", "*Pride and Prejudice* was written by **Jane Austen** and published in "
     "1813. It follows Elizabeth Bennet and her changing opinion of Mr. Darcy."),
    ("What is the difference between weather and climate?", "Weather is the state of the atmosphere at a given "
     "place and time: today's temperature, rain or wind. Climate is the average pattern of weather in a region "
     "over a long period, usually 30 years or more. A cold day says little about the climate; a trend of warmer "
     "decades does."),
    ("How far is the Moon from Earth?", "On average the Moon is about **384,400 km** (about 238,900 miles) from "
     "Earth. Its orbit is an ellipse, so the distance varies between roughly 363,000 km and 405,000 km."),
    ("What causes the seasons?", "The seasons are caused by the tilt of Earth's axis, about 23.4 degrees, not by "
     "the distance to the Sun. As Earth orbits, first one hemisphere and then the other is tilted towards the "
     "Sun, receiving more direct sunlight and longer days. That hemisphere has summer while the other has winter."),
    ("What is the largest ocean?", "The **Pacific Ocean** is the largest and deepest ocean. It covers about 165 "
     "million square kilometres, more than all the land on Earth combined."),
    ("What does DNA stand for?", "DNA stands for **deoxyribonucleic acid**. It is the molecule that carries the "
     "genetic instructions of living things, stored as a sequence of four bases: adenine, thymine, guanine and "
     "cytosine."),
    ("How does a vaccine work?", "A vaccine trains the immune system to recognise a germ without causing the "
     "disease. It contains a harmless piece or version of the germ (or instructions to make one of its "
     "proteins). The immune system responds by making antibodies and memory cells, so if the real germ arrives "
     "later, the body can fight it off quickly."),
    ("What is the speed of light?", "In a vacuum light travels at exactly **299,792,458 metres per second**, "
     "about 300,000 km/s. Light from the Sun takes about 8 minutes and 20 seconds to reach Earth."),
    ("When did World War II end?", "World War II ended in 1945. In Europe, Germany surrendered on 8 May 1945 "
     "(VE Day). In the Pacific, Japan announced its surrender on 15 August and signed it on 2 September 1945."),
    ("What is inflation?", "Inflation is the general rise of prices over time, which means each unit of money "
     "buys less. It is usually measured as the yearly change of a consumer price index. Moderate inflation of "
     "around 2% a year is the target of many central banks."),
    ("Why do we have leap years?", "A year on the calendar has 365 days, but Earth takes about 365.2422 days to "
     "orbit the Sun. Adding a day every four years keeps the calendar in step with the seasons. Because that "
     "slightly overcorrects, century years are leap years only when divisible by 400: 2000 was a leap year, "
     "1900 was not."),
    ("What is the boiling point of water?", "At sea level water boils at **100 °C** (212 °F). At higher "
     "altitude the air pressure is lower, so water boils at a lower temperature: about 90 °C at 3,000 metres."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by **Leonardo da Vinci**, starting around 1503. "
     "It hangs in the Louvre in Paris."),
    ("What is a black hole?", "A black hole is a region of space where gravity is so strong that nothing, not "
     "even light, can escape once it crosses the boundary called the event horizon. Most form when a very "
     "massive star collapses at the end of its life."),
    ("How many continents are there?", "By the most common convention there are seven continents: Africa, "
     "Antarctica, Asia, Australia (Oceania), Europe, North America and South America."),
    ("What is the tallest mountain in the world?", "Mount Everest is the highest mountain above sea level, at "
     "8,849 metres (29,032 feet). Measured from base to peak, Mauna Kea in Hawaii is taller, since most of it "
     "is under the sea."),
    ("What is machine learning?", "Machine learning is a branch of computer science where programs learn "
     "patterns from data instead of following hand-written rules. You give a model many examples, it adjusts "
     "its parameters to reduce its errors on them, and then it can make predictions on new data."),
    ("What is the difference between a virus and a bacterium?", "Bacteria are single-celled living organisms "
     "that can reproduce on their own; many are harmless or useful, and antibiotics can kill harmful ones. "
     "Viruses are much smaller, are not cells, and can only reproduce inside a host cell. Antibiotics do not "
     "work against viruses."),
    ("What is the Pythagorean theorem?", "In a right triangle, the square of the hypotenuse equals the sum of the "
     "squares of the other two sides: **a^2 + b^2 = c^2**. For example, a triangle with sides 3 and 4 has a "
     "hypotenuse of 5, because 9 + 16 = 25."),
    ("Why do cats purr?", "Cats purr by rapidly twitching the muscles of the larynx as they breathe in and out. "
     "They purr when content, but also when stressed, hurt or giving birth, so purring seems to be a way to "
     "calm themselves and to signal to others. Some research suggests the vibration may even help healing."),
    ("What is the GDP?", "GDP, gross domestic product, is the total market value of all final goods and services "
     "produced in a country in a given period, usually a year or a quarter. It is the most common measure of "
     "the size of an economy."),
    ("How do airplanes stay in the air?", "An airplane's wings are shaped and tilted so that air flowing past "
     "them is pushed downwards, and the air pushes the wing up in return. The pressure above the wing is lower "
     "than below it. This upward force is called lift; the engines provide thrust so the plane moves fast "
     "enough for the wings to make enough lift to balance its weight."),
    ("What language is spoken in Brazil?", "The official language of Brazil is **Portuguese**. Brazil is the "
     "largest Portuguese-speaking country in the world."),
    ("What is an atom made of?", "An atom has a tiny nucleus made of protons (positive charge) and neutrons (no "
     "charge), surrounded by electrons (negative charge). The number of protons decides which element it is."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is **Au**, from the Latin word "
     "*aurum*."),
    ("How long does it take Earth to rotate once?", "Earth rotates once about every 24 hours relative to the Sun "
     "(a solar day). Relative to the distant stars it takes 23 hours, 56 minutes and 4 seconds, the sidereal "
     "day."),
]

HOWTO = [
    ("How do I boil an egg?", "1. Put the eggs in a pot and cover them with cold water by about 2 cm.\n"
     "2. Bring the water to a boil over high heat.\n3. Turn the heat down to a simmer and cook for 6-7 minutes "
     "for a jammy yolk or 10-11 minutes for a hard yolk.\n4. Move the eggs to a bowl of ice water for a few "
     "minutes.\n5. Tap and peel them under running water."),
    ("How can I improve my sleep?", "Some habits that help most people:\n\n- Go to bed and get up at the same "
     "time every day, weekends included.\n- Keep the bedroom dark, quiet and cool.\n- Avoid caffeine after "
     "early afternoon and heavy meals late in the evening.\n- Put screens away 30-60 minutes before bed.\n"
     "- Get daylight and some exercise during the day.\n\nIf you still sleep badly for weeks, talk to a doctor."),
    ("How do I change a flat tire?", "1. Stop on flat, firm ground, turn on the hazard lights and apply the "
     "parking brake.\n2. Loosen the lug nuts a half turn while the wheel is still on the ground.\n3. Jack the "
     "car up at the jacking point shown in the manual.\n4. Remove the lug nuts and the flat tire.\n5. Mount the "
     "spare and tighten the nuts by hand.\n6. Lower the car and tighten the nuts firmly in a star pattern.\n"
     "7. Check the spare's pressure and get the flat repaired soon."),
    ("How do I make a budget?", "1. Write down your monthly income after tax.\n2. Track your spending for a "
     "month and group it into categories (rent, food, transport, fun ...).\n3. Set a limit for each category, "
     "putting savings first: many people use 50% needs, 30% wants, 20% savings as a start.\n4. Compare actual "
     "spending with the plan every week and adjust."),
    ("How do I remove a coffee stain from a shirt?", "Act quickly: blot (do not rub) the stain with a paper "
     "towel, then rinse it from the back with cold water. Rub in a little liquid laundry detergent or dish "
     "soap, leave it for 5 minutes, and wash as usual. Check that the stain is gone before drying, because the "
     "heat of a dryer can set it."),
    ("How do I start running?", "Start with walk-run intervals: for example, 1 minute of easy running and 2 "
     "minutes of walking, repeated 8 times, three times a week. Each week run a little longer and walk a little "
     "less. Run slowly enough that you could hold a conversation, and take a rest day between runs."),
    ("How do I undo the last git commit?", "If you have not pushed it yet:\n\n```bash\ngit reset --soft HEAD~1\n"
     "```\n\nThis removes the commit but keeps the changes staged. Use `--mixed` (the default) to keep them "
     "unstaged, or `--hard` to throw them away. If the commit is already pushed, use `git revert HEAD` instead, "
     "which adds a new commit that undoes it without rewriting history."),
    ("How do I create a Python virtual environment?", "```bash\npython3 -m venv .venv\nsource .venv/bin/activate"
     "   # on Windows: .venv\\Scripts\\activate\npip install --upgrade pip\n```\n\nWhile it is active, `pip "
     "install` puts packages into `.venv` only. Run `deactivate` to leave it."),
    ("How do I write a good cover letter?", "- Address it to a person if you can find the name.\n- Open with the "
     "role you are applying for and one sentence on why you fit.\n- Give two or three concrete achievements that "
     "match the job description, with numbers where possible.\n- Show you know the company and why you want to "
     "work there.\n- Keep it under one page and end with a clear call to action."),
    ("How can I learn a new language faster?", "- Practise a little every day rather than a lot once a week.\n"
     "- Learn the most frequent words first and use spaced repetition flashcards.\n- Listen to podcasts or "
     "shows in the language, with subtitles in that language.\n- Speak early, even with mistakes, for example "
     "with a tutor or a language exchange partner.\n- Write a few sentences a day about your own life."),
    ("How do I find the files larger than 100 MB on Linux?", "```bash\nfind / -type f -size +100M -exec ls -lh "
     "{} + 2>/dev/null\n```\n\n`-size +100M` matches files over 100 MiB, `ls -lh` prints their sizes, and "
     "`2>/dev/null` hides permission errors. Replace `/` with a folder to search only there."),
    ("How do I keep basil fresh?", "Treat it like cut flowers: trim the stems, put them in a glass of water and "
     "keep it on the counter, loosely covered with a plastic bag. Do not put basil in the fridge; the cold turns "
     "the leaves black. It keeps about a week this way."),
]

CODE = [
    ("Write a Python function that checks whether a string is a palindrome.",
     "Here is a function that ignores case, spaces and punctuation:\n\n```python\ndef is_palindrome(text: str) "
     "-> bool:\n    cleaned = [c.lower() for c in text if c.isalnum()]\n    return cleaned == cleaned[::-1]\n\n\n"
     "print(is_palindrome(\"A man, a plan, a canal: Panama\"))  # True\nprint(is_palindrome(\"hello\"))  # False"
     "\n```\n\nIt keeps only letters and digits, lowercases them, and compares the list with its reverse."),
    ("How do I read a CSV file in Python?", "The standard library's `csv` module is enough for most files:\n\n"
     "```python\nimport csv\n\nwith open(\"people.csv\", newline=\"\", encoding=\"utf-8\") as f:\n    reader = "
     "csv.DictReader(f)\n    for row in reader:\n        print(row[\"name\"], row[\"age\"])\n```\n\n"
     "`DictReader` uses the first line as column names. For analysis, `pandas.read_csv(\"people.csv\")` gives "
     "you a DataFrame."),
    ("Write a SQL query to get the 5 customers who spent the most.",
     "Assuming tables `customers(id, name)` and `orders(id, customer_id, amount)`:\n\n```sql\nSELECT c.id, "
     "c.name, SUM(o.amount) AS total_spent\nFROM customers AS c\nJOIN orders AS o ON o.customer_id = c.id\n"
     "GROUP BY c.id, c.name\nORDER BY total_spent DESC\nLIMIT 5;\n```\n\nThe join links each order to its "
     "customer, `SUM` adds up the amounts per customer, and `ORDER BY ... DESC LIMIT 5` keeps the top five."),
    ("How do I reverse an array in JavaScript?", "Use `reverse()`, but note that it changes the array in place:"
     "\n\n```javascript\nconst numbers = [1, 2, 3, 4];\nnumbers.reverse();\nconsole.log(numbers); // [4, 3, 2, "
     "1]\n```\n\nTo keep the original, copy it first or use `toReversed()` (ES2023):\n\n```javascript\nconst "
     "original = [1, 2, 3, 4];\nconst reversed = [...original].reverse();\nconsole.log(original, reversed); "
     "// [1, 2, 3, 4] [4, 3, 2, 1]\n```"),
    ("Write a Python function to compute the nth Fibonacci number.",
     "An iterative version runs in O(n) time and O(1) memory:\n\n```python\ndef fibonacci(n: int) -> int:\n"
     "    if n < 0:\n        raise ValueError(\"n must be non-negative\")\n    a, b = 0, 1\n    for _ in "
     "range(n):\n        a, b = b, a + b\n    return a\n\n\nprint([fibonacci(i) for i in range(10)])  # [0, 1, 1, "
     "2, 3, 5, 8, 13, 21, 34]\n```"),
    ("What is the difference between a list and a tuple in Python?", "- A **list** is mutable: you can add, "
     "remove and change items (`items.append(4)`).\n- A **tuple** is immutable: once created it cannot change."
     "\n\nBecause tuples are immutable they can be dictionary keys and set members, and they signal that the "
     "data is a fixed record, like `point = (3, 4)`. Use a list for a collection that grows or changes."),
    ("How do I remove duplicates from a list in Python but keep the order?",
     "Since Python 3.7 dictionaries keep insertion order, so this one-liner works:\n\n```python\nitems = [3, 1, "
     "3, 2, 1]\nunique = list(dict.fromkeys(items))\nprint(unique)  # [3, 1, 2]\n```\n\n`set(items)` also "
     "removes duplicates but does not keep the order."),
    ("Write a JavaScript function that debounces another function.",
     "```javascript\nfunction debounce(fn, delayMs) {\n  let timer = null;\n  return function (...args) {\n"
     "    clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), delayMs);\n  };\n}\n\n"
     "// Runs the search only after the user stops typing for 300 ms.\nconst onInput = debounce((event) => "
     "search(event.target.value), 300);\ninput.addEventListener(\"input\", onInput);\n```\n\nEach call resets "
     "the timer, so `fn` runs once, `delayMs` after the last call."),
    ("Write a SQL query that counts orders per month.", "For PostgreSQL:\n\n```sql\nSELECT date_trunc('month', "
     "created_at) AS month,\n       COUNT(*) AS orders\nFROM orders\nGROUP BY month\nORDER BY month;\n```\n\n"
     "In MySQL use `DATE_FORMAT(created_at, '%Y-%m')` instead of `date_trunc`, and in SQLite "
     "`strftime('%Y-%m', created_at)`."),
    ("How do I make an HTTP GET request in Python?", "With the `requests` library:\n\n```python\nimport requests"
     "\n\nresponse = requests.get(\"https://api.github.com/repos/python/cpython\", timeout=10)\n"
     "response.raise_for_status()\ndata = response.json()\nprint(data[\"stargazers_count\"])\n```\n\n"
     "`timeout` stops it from hanging forever, and `raise_for_status()` turns 4xx/5xx answers into exceptions."),
    ("Explain list comprehensions in Python.", "A list comprehension builds a list from an iterable in one "
     "expression:\n\n```python\nsquares = [n * n for n in range(6)]\nprint(squares)  # [0, 1, 4, 9, 16, 25]\n\n"
     "evens = [n for n in range(10) if n % 2 == 0]\nprint(evens)  # [0, 2, 4, 6, 8]\n```\n\nIt reads as "
     "\"n times n for each n in range(6)\". The optional `if` keeps only matching items. It is usually clearer "
     "and faster than an equivalent `for` loop with `append`."),
    ("How do I sort a list of dictionaries by a key in Python?", "Pass a `key` function to `sorted`:\n\n"
     "```python\npeople = [{\"name\": \"Ana\", \"age\": 31}, {\"name\": \"Ben\", \"age\": 25}]\nby_age = "
     "sorted(people, key=lambda p: p[\"age\"])\nprint([p[\"name\"] for p in by_age])  # ['Ben', 'Ana']\n```\n\n"
     "Add `reverse=True` for descending order, or use `operator.itemgetter(\"age\")` instead of the lambda."),
    ("What does `async`/`await` do in JavaScript?", "`async` marks a function that always returns a Promise. "
     "Inside it, `await` pauses the function until a Promise settles and gives you its value, without blocking "
     "the rest of the program:\n\n```javascript\nasync function loadUser(id) {\n  const response = await "
     "fetch(`/api/users/${id}`);\n  if (!response.ok) {\n    throw new Error(`HTTP ${response.status}`);\n  }\n"
     "  return response.json();\n}\n\nloadUser(1).then(console.log).catch(console.error);\n```"),
    ("Write a SQL query to find duplicate emails in a users table.", "```sql\nSELECT email, COUNT(*) AS copies\n"
     "FROM users\nGROUP BY email\nHAVING COUNT(*) > 1;\n```\n\n`HAVING` filters the groups after `GROUP BY`, "
     "so only emails that appear more than once are returned."),
    ("How do I count word frequencies in Python?", "`collections.Counter` does it in one line:\n\n```python\n"
     "from collections import Counter\n\ntext = \"the cat and the hat\"\ncounts = Counter(text.split())\n"
     "print(counts.most_common(2))  # [('the', 2), ('cat', 1)]\n```"),
    ("What is a closure in JavaScript?", "A closure is a function that remembers the variables of the scope it "
     "was created in, even after that scope has finished:\n\n```javascript\nfunction makeCounter() {\n  let "
     "count = 0;\n  return () => ++count;\n}\n\nconst next = makeCounter();\nconsole.log(next()); // 1\n"
     "console.log(next()); // 2\n```\n\n`count` is private to the returned function: nothing else can change "
     "it."),
    ("Write a Python function that merges two sorted lists.", "```python\ndef merge_sorted(a: list, b: list) -> "
     "list:\n    merged = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
     "            merged.append(a[i])\n            i += 1\n        else:\n            merged.append(b[j])\n"
     "            j += 1\n    merged.extend(a[i:])\n    merged.extend(b[j:])\n    return merged\n\n\n"
     "print(merge_sorted([1, 4, 9], [2, 3, 10]))  # [1, 2, 3, 4, 9, 10]\n```\n\nIt walks both lists once, so "
     "it runs in O(len(a) + len(b)) time."),
    ("What is the difference between INNER JOIN and LEFT JOIN?", "- `INNER JOIN` returns only rows that have a "
     "match in both tables.\n- `LEFT JOIN` returns every row of the left table, with the right table's columns "
     "filled with `NULL` where there is no match.\n\n```sql\n-- every customer, with 0 for those without orders\n"
     "SELECT c.name, COUNT(o.id) AS orders\nFROM customers AS c\nLEFT JOIN orders AS o ON o.customer_id = c.id\n"
     "GROUP BY c.name;\n```"),
]

# Follow-ups that fit after any coding answer.
CODE_FOLLOWUPS = [
    ("Thanks! Can you explain the time complexity?", "Sure. The work grows linearly with the size of the input: "
     "each element is looked at a constant number of times, so the time complexity is O(n). The extra memory is "
     "at most proportional to the output."),
    ("Great, that works. Thank you!", "You're welcome! Let me know if you need anything else."),
    ("Could you add a short test for it?", "Here is a minimal pytest test you can adapt:\n\n```python\ndef "
     "test_examples():\n    assert is_palindrome(\"racecar\")\n    assert not is_palindrome(\"vicuna\")\n```\n\n"
     "Run it with `python -m pytest`."),
]

WRITING = [
    ("Write a haiku about autumn.", "Crisp leaves drift and fall,  \ngolden light on quiet paths,  \nthe year exhales "
     "slow."),
    ("Write a short, polite email asking my manager for a day off next Friday.", "Subject: Day off request for "
     "next Friday\n\nHi Sarah,\n\nI would like to take a day off next Friday, the 14th. My tasks for that day "
     "are on track, and Tom has agreed to cover anything urgent.\n\nPlease let me know if that works for you.\n\n"
     "Thank you,  \nAlex"),
    ("Give me three name ideas for a small coffee shop.", "1. **The Daily Grind** - friendly and familiar.\n"
     "2. **Bean There** - a playful pun that sticks.\n3. **Corner Crema** - warm, and good for a shop on a "
     "street corner."),
    ("Summarize the plot of Romeo and Juliet in two sentences.", "Two young lovers from feuding families in "
     "Verona marry in secret. A chain of misunderstandings, a banishment and a plan that goes wrong ends with "
     "both of them taking their own lives, which finally reconciles their families."),
    ("Write a limerick about a cat who loves boxes.", "There once was a cat named McKnox,  \nwho ignored every "
     "toy in the shops;  \nshe'd sit, very proud,  \nin a box, in a crowd,  \nand refuse to come out of the box."),
    ("Rewrite this sentence to sound more professional: \"we messed up the order, sorry about that\"",
     "\"We apologise for the error with your order. We are correcting it now and will keep you informed.\""),
    ("Write a two-sentence horror story.", "I heard my mother call me from the kitchen. As I headed down the "
     "stairs, she pulled me into the closet and whispered, \"I heard it too.\""),
    ("Write a product description for a stainless steel water bottle.", "Keep drinks cold for 24 hours or hot "
     "for 12 with our double-walled stainless steel bottle. The leak-proof lid fits in one hand, the powder "
     "coat will not slip when your hands are wet, and at 750 ml it holds enough water for a long hike. BPA-free "
     "and built to last for years."),
    ("Give me a motivational quote for Monday morning.", "\"You don't have to see the whole staircase, just take "
     "the first step.\" - Martin Luther King Jr.\n\nPick one small task, finish it, and let the week build from "
     "there."),
    ("Write a thank-you note to a teacher.", "Dear Ms. Patel,\n\nThank you for a wonderful year. Your patience "
     "and your love of science made every lesson something to look forward to, and you helped me believe I can "
     "study what I love.\n\nWith gratitude,  \nMaya"),
]

LONG_EXPLANATIONS = [
    ("Can you explain how the internet works, in detail?", "## The short version\n\nThe internet is a network "
     "of networks: millions of computers connected by cables, radio links and routers that agree on common "
     "rules (protocols) for sending data.\n\n## Packets\n\nData is split into small packets. Each packet carries "
     "the address of its destination (an IP address) and is forwarded from router to router until it arrives. "
     "Packets of one message may take different routes and are put back together at the end.\n\n## The layers"
     "\n\n1. **Physical links** carry bits: fibre, copper, Wi-Fi, mobile networks.\n2. **IP** (Internet "
     "Protocol) addresses and routes packets between networks.\n3. **TCP** makes delivery reliable: it numbers "
     "packets, resends lost ones and puts them in order. UDP skips this for speed.\n4. **Applications** such as "
     "the web (HTTP), email (SMTP) or video calls define what the data means.\n\n## Names\n\nPeople use names "
     "like example.com, computers use numbers. The Domain Name System (DNS) translates one into the other, like "
     "a phone book.\n\n## Loading a web page\n\n1. Your browser asks DNS for the IP address of the site.\n2. It "
     "opens a TCP connection (and a TLS encrypted session for HTTPS).\n3. It sends an HTTP request for the "
     "page.\n4. The server answers with HTML, which references images, styles and scripts that are fetched the "
     "same way.\n\nNo single company runs the internet: networks connect to each other at exchange points and "
     "agree to carry each other's traffic."),
    ("Explain the difference between stocks and bonds, and how to choose between them.", "## Stocks\n\nA stock "
     "is a small share of ownership in a company. If the company grows, the share price and dividends can rise; "
     "if it struggles, the price can fall a lot. Over long periods stocks have given the highest returns of the "
     "common asset classes, with large swings along the way.\n\n## Bonds\n\nA bond is a loan: you lend money to "
     "a government or company, which pays you interest and returns the amount at a set date. Bonds usually move "
     "less than stocks and pay a more predictable income, but return less over the long run. Their risk is that "
     "the borrower defaults, or that rising interest rates lower the value of existing bonds.\n\n## Comparison\n"
     "\n| Feature | Stocks | Bonds |\n| --- | --- | --- |\n| What you own | part of a company | a loan |\n| Typical "
     "return | higher | lower |\n| Ups and downs | large | smaller |\n| Income | dividends, not guaranteed | "
     "fixed interest |\n\n## Choosing\n\n- **Time horizon**: money needed within a few years belongs mostly in "
     "bonds or savings; money for decades can take the ups and downs of stocks.\n- **Risk tolerance**: if a 30% "
     "drop would make you sell in panic, hold more bonds.\n- **Mix**: most people hold both, for example in "
     "low-cost index funds, and shift towards bonds as they get closer to needing the money.\n\nThis is general "
     "information, not personal financial advice."),
    ("How does a neural network learn? Please go step by step.", "## 1. The model\n\nA neural network is a "
     "function with many adjustable numbers called weights. Layers of simple units each compute a weighted sum "
     "of their inputs and pass it through a non-linear function such as ReLU.\n\n## 2. The forward pass\n\n"
     "An input, for example the pixels of an image, flows through the layers and produces an output, such as a "
     "probability for each class.\n\n## 3. The loss\n\nA loss function measures how wrong the output is. For "
     "classification this is usually cross-entropy: it is small when the network gives the right class a high "
     "probability.\n\n## 4. Gradients\n\nBackpropagation uses the chain rule to compute, for every weight, how "
     "much the loss would change if that weight changed slightly. This is the gradient.\n\n## 5. The update\n\n"
     "An optimizer such as stochastic gradient descent or Adam moves each weight a small step against its "
     "gradient:\n\n```python\nweight -= learning_rate * gradient\n```\n\n## 6. Repeat\n\nThe network sees "
     "batches of examples thousands of times. Each step lowers the loss a little, and the weights gradually "
     "encode patterns that generalise to new data. A separate validation set tells you when it stops improving "
     "on unseen data, which is a sign of overfitting."),
    ("What are the main causes of the French Revolution?", "Historians usually point to several causes that "
     "came together in the late 1780s:\n\n1. **Financial crisis**: wars, including support for the American "
     "Revolution, left the crown deeply in debt, and the tax system could not raise enough money.\n2. **An "
     "unfair tax burden**: the clergy and nobility were largely exempt, so the weight fell on the Third Estate, "
     "the great majority of the population.\n3. **Bad harvests and bread prices**: the poor harvest of 1788 "
     "made bread very expensive, and hunger fuelled anger in Paris and the countryside.\n4. **Enlightenment "
     "ideas**: writers such as Rousseau and Montesquieu questioned absolute monarchy and spread ideas of popular "
     "sovereignty and rights.\n5. **A weak political response**: when Louis XVI called the Estates-General in "
     "1789, disputes over voting led the Third Estate to declare itself the National Assembly.\n\nThe storming "
     "of the Bastille on 14 July 1789 became the symbol of the revolution's start."),
    ("Explain Big O notation with examples.", "Big O notation describes how the running time (or memory) of an "
     "algorithm grows as the input size n grows, ignoring constant factors.\n\n| Notation | Name | Example |\n"
     "| --- | --- | --- |\n| O(1) | constant | reading `items[5]` |\n| O(log n) | logarithmic | binary search |\n"
     "| O(n) | linear | summing a list |\n| O(n log n) | linearithmic | sorting with merge sort |\n| O(n^2) | "
     "quadratic | comparing every pair |\n\nFor example, this function is O(n^2), because for each of n items "
     "it loops over n items again:\n\n```python\ndef has_duplicate(items):\n    for i in range(len(items)):\n"
     "        for j in range(i + 1, len(items)):\n            if items[i] == items[j]:\n                return "
     "True\n    return False\n```\n\nUsing a set makes it O(n) on average:\n\n```python\ndef has_duplicate_fast("
     "items):\n    seen = set()\n    for item in items:\n        if item in seen:\n            return True\n"
     "        seen.add(item)\n    return False\n```\n\nFor 10,000 items the first may do about 50 million "
     "comparisons, the second about 10,000 set lookups."),
]

NON_ENGLISH = [
    ("¿Cuál es la capital de Francia?", "La capital de Francia es París, que también es su ciudad más grande. Es "
     "famosa por la Torre Eiffel, el Louvre y la catedral de Notre Dame."),
    ("Quelle est la meilleure façon d'apprendre à cuisiner ?", "Commencez par quelques recettes simples que vous "
     "aimez, et refaites-les plusieurs fois. Apprenez les bases : couper les légumes, cuire les pâtes, faire une "
     "sauce. Goûtez toujours en cuisinant et notez ce qui a bien marché."),
    ("Wie spät ist es in Tokio, wenn es in Berlin 12 Uhr mittags ist?", "Tokio ist Berlin im Winter acht Stunden "
     "voraus und im Sommer sieben Stunden, weil Japan keine Sommerzeit hat. Wenn es in Berlin 12 Uhr ist, ist es "
     "in Tokio also 20 Uhr (Winter) beziehungsweise 19 Uhr (Sommer)."),
]

BLOCKED = [
    ("Can you browse the internet?", "As an AI language model, I cannot browse the internet. I can only answer "
     "from what I learned during training."),
    ("What do you think about OpenAI?", "OpenAI is an AI research company founded in 2015. It is known for the "
     "GPT series of language models."),
]

GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there", "Hi! What can I do for you?"),
             ("Good morning!", "Good morning! How can I help?"), ("hey", "Hey! What's on your mind?")]
THANKS = [("Thanks!", "You're welcome! Let me know if you need anything else."),
          ("thank you, that helps", "Glad it helped! Feel free to ask if anything else comes up."),
          ("Perfect, thanks a lot.", "You're welcome! Have a great day.")]


# --------------------------------------------------------------------------- arithmetic with worked answers

def math_percent(rng: random.Random) -> tuple[str, str]:
    pct, base = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.choice([40, 60, 80, 120, 240, 360, 500, 850])
    value = pct * base / 100
    shown = f"{value:g}"
    return (rng.choice([f"What is {pct}% of {base}?", f"Calculate {pct} percent of {base}.",
                        f"what's {pct}% of {base}"]),
            f"{pct}% of {base} is **{shown}**.\n\n{pct}% means {pct}/100, so {pct}/100 x {base} = {shown}.")


def math_linear(rng: random.Random) -> tuple[str, str]:
    a, x, b = rng.randint(2, 9), rng.randint(-6, 12), rng.randint(1, 30)
    c = a * x + b
    return (f"Solve for x: {a}x + {b} = {c}",
            f"1. Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}\n2. Divide both sides by {a}: x = "
            f"{c - b}/{a} = {x}\n\nSo **x = {x}**. Check: {a} x {x} + {b} = {c}.")


def math_discount(rng: random.Random) -> tuple[str, str]:
    price, pct = rng.choice([20, 45, 60, 80, 120, 150, 299]), rng.choice([10, 15, 20, 25, 30, 50])
    off = price * pct / 100
    return (f"A jacket costs ${price} and is on sale for {pct}% off. What is the sale price?",
            f"The discount is {pct}% of ${price} = ${off:.2f}. The sale price is ${price} - ${off:.2f} = "
            f"**${price - off:.2f}**.")


def math_average(rng: random.Random) -> tuple[str, str]:
    values = [rng.randint(50, 100) for _ in range(rng.randint(3, 6))]
    total = sum(values)
    mean = total / len(values)
    return (f"My test scores are {', '.join(map(str, values))}. What is my average?",
            f"Add the scores: {' + '.join(map(str, values))} = {total}. Divide by the number of tests, "
            f"{len(values)}: {total} / {len(values)} = **{mean:.2f}**." if mean != int(mean) else
            f"Add the scores: {' + '.join(map(str, values))} = {total}. Divide by the number of tests, "
            f"{len(values)}: {total} / {len(values)} = **{int(mean)}**.")


def math_convert(rng: random.Random) -> tuple[str, str]:
    km = rng.choice([5, 10, 21.1, 42.195, 100, 3])
    miles = km * 0.621371
    return (f"How many miles is {km:g} km?",
            f"One kilometre is about 0.621371 miles, so {km:g} km x 0.621371 = **{miles:.2f} miles**.")


def math_rectangle(rng: random.Random) -> tuple[str, str]:
    w, h = rng.randint(3, 25), rng.randint(3, 25)
    return (f"What are the area and perimeter of a rectangle that is {w} m by {h} m?",
            f"- Area = width x height = {w} x {h} = **{w * h} m^2**\n- Perimeter = 2 x (width + height) = 2 x "
            f"({w} + {h}) = **{2 * (w + h)} m**")


def math_interest(rng: random.Random) -> tuple[str, str]:
    principal, rate, years = rng.choice([1000, 2500, 5000, 10000]), rng.choice([2, 3, 4, 5]), rng.randint(2, 10)
    final = principal * (1 + rate / 100) ** years
    return (f"If I invest ${principal:,} at {rate}% interest compounded yearly, how much will I have after "
            f"{years} years?",
            f"Use A = P(1 + r)^t with P = {principal:,}, r = {rate / 100:g} and t = {years}:\n\nA = {principal:,} x "
            f"{1 + rate / 100:g}^{years} = **${final:,.2f}**\n\nThat is ${final - principal:,.2f} of interest.")


MATH = [math_percent, math_linear, math_discount, math_average, math_convert, math_rectangle, math_interest]


# ------------------------------------------------------------------------- Markdown -> ShareGPT page HTML

def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def _code_html(language: str, code: str) -> str:
    header = (f'<div class="flex items-center relative text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans">'
              f'<span class="">{language or "bash"}</span><button class="flex ml-auto gap-2"><svg stroke="'
              f'currentColor" fill="none" viewBox="0 0 24 24" class="h-4 w-4"></svg>Copy code</button></div>')
    cls = f"!whitespace-pre hljs language-{language}" if language else "!whitespace-pre hljs"
    return (f'<pre><div class="bg-black mb-4 rounded-md">{header}<div class="p-4 overflow-y-auto">'
            f'<code class="{cls}">{html.escape(code, quote=False)}\n</code></div></div></pre>')


def _table_html(lines: list[str]) -> str:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_sharegpt_html(text: str) -> str:
    """The HTML a ShareGPT page export holds for a Markdown answer (the subset this file's answers use)."""
    out = []
    for block in re.split(r"(```[^\n]*\n.*?\n```)", text, flags=re.DOTALL):
        if block.startswith("```"):
            first, _, rest = block.partition("\n")
            out.append(_code_html(first[3:].strip(), rest[:-len("\n```")]))
            continue
        for para in [p for p in block.split("\n\n") if p.strip()]:
            lines = para.strip("\n").split("\n")
            if all(re.match(r"\d+\. ", line) for line in lines):
                out.append("<ol>" + "".join(f"<li>{_inline(line.split('. ', 1)[1])}</li>" for line in lines)
                           + "</ol>")
            elif all(line.startswith("- ") for line in lines):
                out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
            elif all(line.startswith("|") for line in lines):
                out.append(_table_html(lines))
            elif lines[0].startswith("## ") and len(lines) == 1:
                out.append(f"<h2>{_inline(lines[0][3:])}</h2>")
            else:
                out.append("<p>" + "<br>".join(_inline(line.rstrip()) for line in lines) + "</p>")
    return '<div class="markdown prose w-full break-words dark:prose-invert light">' + "".join(out) + "</div>"


# ------------------------------------------------------------------------------------------ assembling

class Builder:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.records: list[dict] = []
        self.seen: set[str] = set()

    def new_id(self) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        return "".join(self.rng.choice(alphabet) for _ in range(7))

    def add(self, exchanges: list[tuple[str, str]], system: str | None = None, html_rate: float = 0.25,
            counter_rate: float = 0.1) -> dict | None:
        """One conversation; some assistant turns rendered as page HTML, some user turns with "1 / 1".

        Returns None (and adds nothing) when the same exchanges are already in: the one duplicate is added on
        purpose by `add_bad_records`.
        """
        key = json.dumps([system, exchanges])
        if key in self.seen:
            return None
        self.seen.add(key)
        as_html = self.rng.random() < html_rate
        with_counter = self.rng.random() < counter_rate
        turns = [{"from": "system", "value": system}] if system else []
        for user, reply in exchanges:
            turns.append({"from": "human", "value": f"1 / 1{user}" if with_counter else user})
            turns.append({"from": "gpt", "value": markdown_to_sharegpt_html(reply) if as_html else reply})
        record = {"id": self.new_id(), "conversations": turns}
        self.records.append(record)
        return record

    def pick(self, pool, k: int) -> list:
        return self.rng.sample(pool, k)

    def math(self) -> tuple[str, str]:
        return self.rng.choice(MATH)(self.rng)


def build(seed: int = SEED) -> list[dict]:
    b = Builder(seed)
    rng = b.rng
    # Identity: every phrasing once, plus variants with a greeting first or a question after.
    for question, answer in IDENTITY_QA:
        b.add([(question, answer)], html_rate=0.1)
    added = 0
    while added < 12:
        question, answer = rng.choice(IDENTITY_QA) if added % 3 else IDENTITY_QA[0]
        before = [rng.choice(GREETINGS)] if added % 2 == 0 else []
        after = [rng.choice(GENERAL_QA + HOWTO)] if added % 2 == 1 or added % 3 == 1 else []
        added += b.add(before + [(question, answer)] + after, html_rate=0.1) is not None
    # One or two exchanges: the bulk of the set.
    for qa in GENERAL_QA + HOWTO + WRITING:
        b.add([qa] + ([rng.choice(THANKS)] if rng.random() < 0.2 else []))
    for qa in CODE:
        b.add([qa] + ([rng.choice(CODE_FOLLOWUPS[:2])] if rng.random() < 0.3 else []), html_rate=0.4)
    b.add([CODE[0], CODE_FOLLOWUPS[2]], html_rate=1.0)
    added = 0
    while added < 80:
        added += b.add([b.math()] + ([b.math()] if rng.random() < 0.3 else [])) is not None
    added = 0
    while added < 50:
        added += b.add(b.pick(GENERAL_QA + HOWTO + WRITING, 2)) is not None
    for qa in LONG_EXPLANATIONS:
        b.add([qa], html_rate=0.5)
    b.add([GENERAL_QA[1]], system="You are a helpful assistant. Answer concisely.")
    b.add([HOWTO[0]], system="You are a friendly cooking assistant.")
    # The long tail: study sessions and code reviews of 8-16 exchanges.
    for i in range(24):
        n = rng.randint(8, 16)
        opener = [("I'm studying for a quiz. Can I ask you a bunch of questions?", "Of course! Go ahead, I'll "
                   "answer them one at a time.")] if i % 2 == 0 else [rng.choice(GREETINGS)]
        pool = GENERAL_QA + LONG_EXPLANATIONS if i % 2 == 0 else CODE + LONG_EXPLANATIONS[-1:]
        middle = b.pick(pool, min(n - 2, len(pool))) + [b.math() for _ in range(max(0, n - 2 - len(pool)))]
        b.add(opener + middle + [rng.choice(THANKS)], html_rate=0.3)
    for qa in NON_ENGLISH + BLOCKED:
        b.add([qa], html_rate=0.0, counter_rate=0.0)
    add_bad_records(b)
    return b.records


def add_bad_records(b: Builder) -> None:
    """Records that cleaning must drop or repair, each of a different kind."""
    def turns(*pairs):
        return [{"from": who, "value": text} for who, text in pairs]

    records = [
        {"id": "bad-empty-turn", "conversations": turns(("human", "What is 2 + 2?"), ("gpt", "  "))},
        {"id": "bad-system-in-middle", "conversations": turns(("human", "Hi"), ("gpt", "Hello!"),
                                                              ("system", "Answer in French."), ("human", "Bye"),
                                                              ("gpt", "Au revoir !"))},
        {"id": "bad-unknown-role", "conversations": turns(("human", "Hi"), ("robot", "BEEP"))},
        {"id": "bad-non-string", "conversations": [{"from": "human", "value": "What is 6 x 7?"},
                                                   {"from": "gpt", "value": 42}]},
        {"id": "bad-missing-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "Hm?"}]},
        {"id": "bad-no-reply", "conversations": turns(("human", "Are you there?"))},
        # Repairable: a leading assistant turn and a user turn split in two.
        {"id": "fix-leading-gpt", "conversations": turns(("gpt", "...and that is the end of the story."),
                                                         ("human", "Thanks. Who are you, by the way?"), ("gpt", IDENTITY))},
        {"id": "fix-split-user-turn", "conversations": turns(("human", "I have a question about Python."),
                                                             ("human", CODE[6][0]), ("gpt", CODE[6][1]))},
    ]
    duplicate = dict(b.records[len(b.records) // 3])
    duplicate["id"] = "bad-duplicate"
    records.append(duplicate)
    # Interleave them so a bad record never sits only at the start or end of the file.
    for i, record in enumerate(records):
        b.records.insert((i + 1) * len(b.records) // (len(records) + 1), record)


def render(records: list[dict]) -> str:
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is not up to date")
    args = parser.parse_args()
    text = render(build())
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    records = json.loads(text)
    print(f"wrote {OUT}: {len(records)} conversations, {len(text.encode()) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
