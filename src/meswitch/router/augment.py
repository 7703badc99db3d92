"""Synthetic training styles for the router: text made from templates and training-side material.

Each function returns labelled ``Example``s in a style users write in but the zoo's text lacks. All
wording here is meswitch's own; none of it comes from an out-of-source set (``meswitch.router.data``):

- ``analytic_math_questions``: competition-style math with numbers drawn at random: coordinate
  geometry (points, lines, triangles, circles, vectors), counting and number theory (primes in a
  range, divisors, multiples, digits, factorials), combinatorics and probability, each optionally
  followed by a numbered list of answer-format rules;
- ``prose_code_requests``: requests for code in prose, in the voice of a chat user: a persona or
  some context, a named language or framework, a software task, sometimes a pasted snippet to test,
  explain, fix or translate;
- ``with_constraints``: general prompts with one or two formatting constraints from ``TRAIN_CONSTRAINTS``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from meswitch.data.examples import Example

TRAIN_CONSTRAINTS = (
    "Answer in at most 50 words.",
    "Use exactly three bullet points.",
    "Write your whole answer in lowercase letters.",
    "End your answer with the phrase 'Is there anything else?'",
    "Do not use any commas in your response.",
    "Give two different answers separated by six asterisks ******.",
    "Put a title in double angular brackets, like <<title>>.",
    "Your answer must have 3 paragraphs separated by ***.",
    "Respond in fewer than 4 sentences.",
    "Highlight at least 2 sections with markdown, i.e. *highlighted section*.",
    "Reply in a single paragraph.",
    "Keep it under 120 words.",
    "Present your answer as a table with two columns.",
    "Return your answer as a YAML document.",
    "Give the answer as a JSON object with the keys 'answer' and 'reason'.",
    "Put your entire answer between single quotes.",
    "Close with a line that begins with 'Note:'.",
    "Add a short summary at the end, starting with 'In short,'.",
    "Begin your answer with 'Sure'.",
    "Do not use the letter 'z' anywhere in your reply.",
    "Mention the word 'balance' at least twice.",
    "Use no more than 6 sentences.",
    "Split your answer into two sections titled SECTION 1 and SECTION 2.",
    "Write it as a short poem.",
    "Explain it as if I were ten years old.",
    "Use a formal tone and no contractions.",
    "Answer in the style of a pirate.",
    "List the points with letters a), b), c).",
    "Make every sentence start with a verb.",
    "Use at least two quotes from famous people.",
    "Include a relevant emoji in every paragraph.",
    "Repeat my request word for word before you answer it.",
    "Use bold text for the key terms.",
    "Write at least 300 words.",
    "Answer first in English, then in French.",
    "Finish with a question for me.",
    "Sign off with your name as 'Your assistant'.",
    "Separate the paragraphs with the markdown divider ---.",
    "Give your answer in the form of a dialogue between two people.",
    "Avoid jargon and keep sentences short.",
)


def with_constraints(texts: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` of ``texts`` (general prompts) with one constraint, or two (a third of them), appended."""
    rng = random.Random(seed)
    pool = list(texts)
    rng.shuffle(pool)
    out = []
    for e in pool[:n]:
        extra = rng.sample(TRAIN_CONSTRAINTS, 2 if rng.random() < 0.33 else 1)
        out.append(Example(" ".join([e.text.rstrip(), *extra]), "general", "", f"{e.source}+constraint"))
    return out


# ------------------------------------------------------------------------------------------ math
_FORMAT_RULES = (
    "Round every decimal to two places.", "Give exact values where you can (fractions, square roots).",
    "Write points as ordered pairs.", "Express angles in degrees.", "State the final answer on its own line.",
    "Simplify fractions fully.", "Do not use a calculator; show the working.", "Answer with a single number.",
    "Use radians for angles.", "Give the answer to 4 significant figures.",
)
_LEADS = ("Rules for your answer:", "Answer format:", "Please follow these rules:", "Instructions:")


def _pt(rng: random.Random) -> tuple[int, int]:
    return rng.randint(-12, 12), rng.randint(-12, 12)


def _geometry(rng: random.Random) -> str:
    (a, b), (c, d), (e, f) = _pt(rng), _pt(rng), _pt(rng)
    p, q, r = rng.sample("ABCDEFGHKLMNPQRSTUVW", 3)
    asks = (
        f"What is the distance between the points {p}({a}, {b}) and {q}({c}, {d})?",
        f"Find the midpoint of the segment joining ({a}, {b}) and ({c}, {d}).",
        f"Find the slope of the line through ({a}, {b}) and ({c}, {d}).",
        f"Write the equation of the line passing through {p}=({a}, {b}) and {q}=({c}, {d}) in the form y = mx + c.",
        f"A triangle has corners {p}=({a}, {b}), {q}=({c}, {d}) and {r}=({e}, {f}). What is its area?",
        f"The vertices of triangle {p}{q}{r} are {p}({a},{b}), {q}({c},{d}), {r}({e},{f}). Find its perimeter.",
        f"Compute the centroid of the triangle with vertices ({a}, {b}), ({c}, {d}), ({e}, {f}).",
        f"Triangle {p}{q}{r} has {p}=({a}, {b}), {q}=({c}, {d}), {r}=({e}, {f}). Find the angle at {q} in degrees.",
        f"Find the circumcenter of the triangle whose vertices are ({a}, {b}), ({c}, {d}) and ({e}, {f}).",
        f"What is the length of the altitude from {r}=({e}, {f}) to the line through {p}=({a}, {b}) and {q}=({c}, {d})?",
        f"A circle has centre ({a}, {b}) and passes through ({c}, {d}). Find its equation and its area.",
        f"Does the point ({e}, {f}) lie inside the circle x^2 + y^2 = {rng.randint(10, 200)}?",
        f"Find the angle between the vectors u = ({a}, {b}) and v = ({c}, {d}).",
        f"Reflect the point ({a}, {b}) in the line y = x, then translate it by ({c}, {d}). Where does it end up?",
        f"Find the point where the lines y = {a}x + {b} and y = {c}x + {d} intersect.",
        f"A rectangle has opposite corners at ({a}, {b}) and ({c}, {d}). What are its area and diagonal?",
        f"Is the triangle with vertices ({a}, {b}), ({c}, {d}), ({e}, {f}) acute, right or obtuse?",
        f"The legs of a right triangle are {abs(a) + 3} and {abs(c) + 4}. Find the hypotenuse and the inradius.",
    )
    return rng.choice(asks)


def _primes(n: int) -> list[int]:
    sieve = bytearray([1]) * (n + 1)
    sieve[:2] = b"\0\0"
    for i in range(2, math.isqrt(n) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return [i for i, v in enumerate(sieve) if v]


def _numbers(rng: random.Random) -> str:
    lo = rng.randint(2, 5000)
    hi = lo + rng.randint(50, 3000)
    n, k = rng.randint(20, 2000), rng.randint(3, 40)
    word = rng.choice(["LEVEL", "BANANA", "MATH", "SUCCESS", "ORANGE", "COMBINE", "PEPPER"])
    asks = (
        f"How many primes lie between {lo} and {hi}?",
        f"Determine the number of prime numbers p with {lo} < p < {hi}.",
        f"How many integers from 1 to {n} are divisible by {k} but not by {k + 1}?",
        f"How many positive divisors does {n} have?",
        f"Find the sum of all positive divisors of {n}.",
        f"What is the largest prime factor of {n * k + 1}?",
        f"Is {rng.choice(_primes(3000)[100:]) * rng.choice([1, 1, 3, 7])} a prime number? Justify your answer.",
        f"What is the last digit of {k}^{n}?",
        f"Find the remainder when {k}^{n} is divided by {rng.randint(5, 13)}.",
        f"How many trailing zeros does {n}! have?",
        f"Find the number of ordered pairs of positive integers (x, y) with x + y = {n} and gcd(x, y) = 1.",
        f"Compute the sum of the first {k} odd primes.",
        f"In how many ways can the letters of the word {word} be arranged?",
        f"How many subsets of a set with {k} elements contain exactly 3 elements?",
        f"Two fair dice are rolled. What is the probability that the sum is {rng.randint(2, 12)}?",
        f"A bag holds {k} red and {k + 3} blue balls. Two are drawn without replacement. Find P(both red).",
        f"Find all integer solutions of {k}x + {k + 1}y = {n}.",
        f"What is the smallest positive integer that leaves remainder 1 when divided by 2, 3, 4, 5 and {k}?",
        f"Evaluate the sum 1/(1*2) + 1/(2*3) + ... + 1/({n}*{n + 1}).",
        f"Find the {k}th term of the arithmetic sequence {lo}, {lo + k}, {lo + 2 * k}, ...",
    )
    return rng.choice(asks)


def analytic_math_questions(n: int, seed: int) -> list[Example]:
    """``n`` competition-style questions: half geometry, half numbers; a third with format rules."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = _geometry(rng) if i % 2 == 0 else _numbers(rng)
        if rng.random() < 0.35:
            rules = rng.sample(_FORMAT_RULES, rng.randint(2, 3))
            q += f"\n{rng.choice(_LEADS)}\n" + "\n".join(f"{j + 1}. {r}" for j, r in enumerate(rules))
        out.append(Example(q, "math", "", "meswitch/analytic_math"))
    return out


# ------------------------------------------------------------------------------------------ code
_STACKS = (
    "Python", "JavaScript", "TypeScript", "Java", "C++", "C#", "Go", "Rust", "Kotlin", "Swift", "PHP", "Ruby",
    "SQL", "Bash", "PowerShell", "R", "Scala", "Dart", "Lua", "MATLAB", "React", "Vue", "Angular", "Node.js",
    "Express", "Django", "Flask", "FastAPI", "Spring Boot", "Laravel", "Rails", ".NET", "Flutter", "Android",
    "iOS", "Unity", "pandas", "NumPy", "PyTorch", "TensorFlow", "PostgreSQL", "MySQL", "MongoDB", "Redis",
    "Kafka", "Docker", "Kubernetes", "Terraform", "AWS Lambda", "Google Apps Script", "Excel VBA", "HTML and CSS",
    "jQuery", "Next.js", "GraphQL", "Selenium", "Arduino", "Solidity",
)
_APP_TASKS = (
    "a login page with email and password validation", "a REST API with endpoints to create, read, update and "
    "delete users", "a todo list app that saves items in local storage", "a chat server using websockets",
    "a web scraper that saves product prices to a CSV file", "a script that backs up a database every night",
    "a function that paginates query results", "a dropdown menu that loads its options from an API",
    "a job queue with retries and exponential backoff", "a rate limiter middleware",
    "a dashboard that shows sales per month as a bar chart", "a file upload form with a progress bar",
    "unit tests for a shopping cart class", "a CLI tool that renames photos by their date",
    "a class that reads a config file and validates it", "a cron job that sends a reminder email",
    "a stored procedure that archives old orders", "a migration that adds an index to the orders table",
    "a component that shows a modal dialog with a form", "a Dockerfile for a small web service",
    "a GitHub Actions workflow that runs the tests", "a caching layer in front of a slow API",
    "a function to validate an IBAN", "a binary search tree with insert and delete", "a snake game",
    "a producer and a consumer for a message queue", "an authentication middleware using JWT",
    "a bot that replies to messages on Discord", "a data pipeline that cleans and merges two CSV files",
    "a script that monitors disk usage and alerts when it is above 90%", "an endpoint that streams a large file",
    "a custom hook that fetches data and handles loading state", "a search box with autocomplete",
    "a parser for a simple arithmetic expression language", "a linked list with a reverse method",
    "a plugin that adds a settings page", "a trigger that logs every change to a table",
)
_PERSONAS = (
    "You are a senior {s} developer.", "I want you to act as an experienced {s} engineer.",
    "Act as a {s} expert and code reviewer.", "I'm a beginner learning {s}.", "I am building a project in {s}.",
    "We are migrating our backend to {s}.", "My team uses {s} at work.", "", "", "",
)
_CODE_ASKS = (
    "Write {task} in {s}.", "Can you build {task} using {s}?", "Please implement {task} with {s}.",
    "I need {task}; please write the {s} code.", "Show me the code for {task} in {s}, with comments.",
    "Generate {task} in {s} and explain each part.", "How would I write {task} in {s}?",
    "Give me a complete example of {task} in {s}.", "create {task} in {s}", "{s}: {task}, please.",
    "write me {task} in {s}", "could you write me {task}? it has to be {s}", "hey, i need {task} in {s}",
    "Can you give me {s} code for {task}?", "What's the best way to code {task} in {s}?",
    "I'm stuck writing {task} in {s}. Can you help me with the code?",
)
_SNIPPET_ASKS = (
    "Write unit tests for this function:", "Explain what this code does, line by line:",
    "Find the bug in this code and fix it:", "Rewrite this in {s}:", "Refactor this to be more readable:",
    "Add type hints and docstrings to this code:", "Why is this slow, and how can I speed it up?",
    "Convert the following code to {s}:", "Review this code and suggest improvements:",
)


def prose_code_requests(tasks: Sequence[str], snippets: Sequence[str], n: int, seed: int) -> list[Example]:
    """``n`` requests for code in prose: a persona or context, an ask, a language or framework and a task.

    ``tasks``: short task phrases ("return the n-th Fibonacci number"), e.g. from docstrings; mixed
    with the application tasks above. ``snippets``: code to paste under an ask (a fifth of the requests).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.choice(_STACKS)
        persona = rng.choice(_PERSONAS).format(s=s)
        if snippets and rng.random() < 0.2:
            code = rng.choice(snippets)
            text = f"{persona} {rng.choice(_SNIPPET_ASKS).format(s=rng.choice(_STACKS))}\n\n{code}"
        else:
            task = rng.choice(_APP_TASKS) if not tasks or rng.random() < 0.5 else f"a function to {rng.choice(tasks)}"
            text = f"{persona} {rng.choice(_CODE_ASKS).format(task=task, s=s)}"
            if rng.random() < 0.3:
                text += rng.choice((" Keep it short.", " Use best practices.", " Include error handling.",
                                    " Explain the design first, then write the code.", " Add tests too."))
        out.append(Example(re.sub(r"\s+\n", "\n", text.strip()), "code", "", "meswitch/code_request"))
    return out


# --------------------------------------------------------------------------------------- general
# The same chat voice as the code requests (a persona, an ask, a task), for tasks that need no code:
# so that a persona, "write me a ..." or a technology named in passing is not what makes a request code.
_ROLES = (
    "travel agent", "chef", "fitness coach", "historian", "copywriter", "career coach", "teacher",
    "novelist", "lawyer", "doctor", "marketing manager", "financial advisor", "therapist", "comedian",
    "tech journalist", "product manager", "wedding planner", "gardener", "sales manager", "poet",
)
_GENERAL_TASKS = (
    "a cover letter for a marketing job", "a 3-day itinerary for Lisbon", "a script for a 2-minute YouTube intro",
    "a wedding toast for my brother", "a product description for a handmade candle", "a workout plan for beginners",
    "a summary of the causes of the French Revolution", "a bedtime story about a shy dragon",
    "a LinkedIn post about my promotion", "a polite email declining a meeting", "a video script about learning to cook",
    "a blog post about the future of electric cars", "an explanation of how the internet works for kids",
    "a comparison of two phones for my grandmother", "a review of the latest smartphone", "a speech for a school "
    "graduation", "a press release for our new app launch", "a list of interview questions for a nurse",
    "a weekly meal plan for a vegetarian", "a birthday message for my boss", "tips for managing a remote team",
    "a short essay on climate change", "a complaint letter about a late delivery", "a haiku about the ocean",
    "a guide to choosing a laptop for college", "a pitch for a startup that sells plants", "an apology text to a "
    "friend", "a description of the water cycle", "a plan to save money for a house", "a eulogy for my grandfather",
    "social media captions for a bakery", "a newsletter about our company's year", "a FAQ for a yoga studio",
    "an outline for a presentation on renewable energy", "a song about summer", "a job description for a "
    "data analyst", "a study schedule for my exams", "a thank-you note to my teacher", "a dialogue between two "
    "friends planning a trip",
)
_GENERAL_PERSONAS = (
    "You are an experienced {r}.", "I want you to act as a {r}.", "Act as a {r}.", "Pretend you are a {r}.",
    "I'm working with a {r}.", "", "", "",
)
_GENERAL_ASKS = (
    "Write {task}.", "Can you write {task}?", "Please draft {task}.", "write me {task}", "I need {task}.",
    "Give me {task}.", "Help me with {task}.", "could you create {task} for me?", "hey, i need {task}",
    "Create {task}, please.", "What would be a good way to write {task}?", "Generate {task} and explain your choices.",
)


def prose_general_requests(n: int, seed: int) -> list[Example]:
    """``n`` requests in the chat voice of ``prose_code_requests`` for writing, advice and explanation tasks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        persona = rng.choice(_GENERAL_PERSONAS).format(r=rng.choice(_ROLES))
        text = f"{persona} {rng.choice(_GENERAL_ASKS).format(task=rng.choice(_GENERAL_TASKS))}".strip()
        if rng.random() < 0.3:
            text += rng.choice((" Keep it short.", " Make it friendly.", " Use a formal tone.",
                                " Explain your reasoning first.", " Add a catchy title."))
        out.append(Example(text, "general", "", "meswitch/general_request"))
    return out
