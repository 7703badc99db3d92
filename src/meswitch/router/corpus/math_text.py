"""Math text in the styles of competitions, proofs and textbooks, made by meswitch from templates and sympy.

Three generators, each ``(n, seed) -> list[Example]``, deterministic in ``seed``:

- ``competition_problems``: short problems in the phrasing of contest sets (LaTeX in ``$...$``,
  "Let ... Find ...", "How many ordered pairs ...", sometimes with multiple-choice options);
- ``proof_requests``: "Prove that ..." / "Show that ..." statements from number theory, algebra,
  analysis, geometry and combinatorics;
- ``symbolic_exercises``: random expressions drawn with sympy and printed as LaTeX, under a
  textbook verb ("Differentiate", "Evaluate the limit", "Factor", "Solve").
"""

from __future__ import annotations

import random

from meswitch.data.examples import Example


def _mc(rng: random.Random, answer: int) -> str:
    """Five multiple-choice options in the contest ``\\textbf{(A)}`` style, one of them ``answer``."""
    opts = sorted({answer, *(answer + rng.choice([-1, 1]) * rng.randint(1, 9) for _ in range(6))})[:5]
    while len(opts) < 5:
        opts.append(opts[-1] + rng.randint(1, 5))
    return " ".join(f"$\\textbf{{({chr(65 + i)})}}\\ {v}$" for i, v in enumerate(opts))


def _competition(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 19) for _ in range(4))
    n, m, k = rng.randint(20, 400), rng.randint(3, 13), rng.randint(2, 9)
    templates = (
        f"Let $f(x) = {a}x^2 - {b}x + {c}$. What is the value of $f({d}) - f({k})$?",
        f"What is the remainder when ${a}^{{{n}}}$ is divided by ${m}$?",
        f"How many positive integers less than ${n * 10}$ are multiples of ${a}$ but not multiples of ${b}$?",
        f"Find the sum of all real numbers $x$ such that $x^2 - {a + b}x + {a * b} = 0$.",
        f"If $\\log_{{{k}}} x = {m}$, what is $\\log_{{{k}}} (x^{{{a}}})$?",
        f"The sum of two numbers is ${a + b}$ and their difference is ${abs(a - b)}$. What is their product?",
        f"In triangle $ABC$, $AB = {a}$, $BC = {b}$, and $\\angle ABC = 60^\\circ$. Find $AC^2$.",
        f"Compute $\\displaystyle\\sum_{{k=1}}^{{{n}}} k^2$.",
        f"Find the number of ordered pairs $(a, b)$ of positive integers such that $ab = {n}$.",
        f"What is the coefficient of $x^{{{k}}}$ in the expansion of $(x + {a})^{{{k + m}}}$?",
        f"Each interior angle of a regular polygon measures ${180 - 360 // (k + 3)}^\\circ$. How many sides does it have?",
        f"Simplify $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$ and express the answer as a common fraction.",
        f"Find all real solutions of $\\sqrt{{x + {a}}} = x - {b}$.",
        f"The mean of ${k + 3}$ numbers is ${n}$. When the number ${a * 10}$ is removed, what is the mean of the rest?",
        f"Let $a_1 = {a}$ and $a_{{n+1}} = {k}a_n - {b}$ for $n \\ge 1$. Find $a_{{{m % 6 + 3}}}$.",
        f"What is the smallest positive integer $n$ such that ${a}n \\equiv {b} \\pmod{{{m + 4}}}$?",
        f"A circle is inscribed in a square of side length ${a}$. What is the area inside the square but outside "
        "the circle? Express your answer in terms of $\\pi$.",
        f"Find the maximum value of ${a}\\sin x + {b}\\cos x$ over all real $x$.",
        f"If $x + \\frac{{1}}{{x}} = {k}$, what is $x^3 + \\frac{{1}}{{x^3}}$?",
        f"In how many ways can a committee of ${k}$ be chosen from ${n // 10 + k + 2}$ people if two of them refuse "
        "to serve together?",
        f"A fair coin is flipped ${k + 4}$ times. What is the probability of getting exactly ${k}$ heads? Express "
        "your answer as a common fraction.",
        f"Find the determinant of $\\begin{{pmatrix}} {a} & {b} \\\\ {c} & {d} \\end{{pmatrix}}$.",
        f"Let $z = {a} + {b}i$. Compute $|z^2|$ and $\\frac{{z}}{{\\bar z}}$.",
        f"Find the domain of $f(x) = \\frac{{\\sqrt{{x - {a}}}}}{{x^2 - {b * b}}}$. Give your answer in interval notation.",
        f"What is the range of $y = x^2 - {2 * a}x + {b}$?",
        f"Find the inverse of the function $f(x) = \\frac{{{a}x + {b}}}{{{c}x + {d}}}$.",
        f"Compute $\\lim_{{x \\to {a}}} \\frac{{x^2 - {a * a}}}{{x - {a}}}$.",
        f"Real numbers $x$ and $y$ satisfy $x + y = {a}$ and $xy = {b}$. What is $x^2 + y^2$?",
        f"How many {k}-digit positive integers have digits whose sum is ${m}$?",
        f"The side lengths of a triangle are ${a}$, ${a + 1}$ and ${a + 2}$. What is the cosine of its largest angle?",
        f"Two circles of radii ${a}$ and ${b}$ are externally tangent. What is the length of a common external tangent?",
        f"What is the units digit of $\\displaystyle\\prod_{{k=1}}^{{{n}}} (2k + 1)$?",
        f"Let $P(x)$ be a polynomial with $P({a}) = {b}$ and $P({c}) = {d}$. What is the remainder when $P(x)$ is "
        f"divided by $(x - {a})(x - {c})$?",
        f"For how many integers $n$ between $1$ and ${n}$ is $\\frac{{n}}{{{n + m}}}$ a terminating decimal?",
        f"A geometric sequence has first term ${a}$ and common ratio $\\frac{{1}}{{{k}}}$. Find the sum of all its terms.",
        f"The points $({a}, {b})$, $({c}, {d})$ and $(x, {k})$ are collinear. Find $x$.",
        f"A bag has ${a}$ red, ${b}$ green and ${c}$ blue marbles. Three are drawn without replacement. What is "
        "the probability that all three have different colors?",
        f"Find the least common multiple of ${a * k}$, ${b * k}$ and ${c * m}$.",
        f"Solve the system $\\begin{{cases}} {a}x + {b}y = {c} \\\\ {d}x - {k}y = {m} \\end{{cases}}$.",
        f"What is the sum of the digits of $10^{{{k + 20}}} - {n}$?",
    )
    q = rng.choice(templates)
    style = rng.random()
    if style < 0.15:
        q = q.replace("$", "").replace("\\displaystyle", "")  # plain text, as typed into a chat box
    elif style < 0.3:
        q += "\n\n" + _mc(rng, rng.randint(1, 120))
    elif style < 0.4:
        q = f"Problem {rng.randint(1, 25)}. {q}"
    elif style < 0.5:
        q += rng.choice((" Express your answer in simplest form.", " Give your answer as an integer.",
                         " Put your final answer in \\boxed{}.", " Justify your answer."))
    return q


def competition_problems(n: int, seed: int) -> list[Example]:
    """``n`` contest-style problems (LaTeX, plain text, multiple choice), source ``meswitch/competition``."""
    rng = random.Random(seed)
    return [Example(_competition(rng), "math", "", "meswitch/competition") for _ in range(n)]


_DIVISIBLE = (("n^3 - n", 6), ("n^5 - n", 30), ("4^n - 1", 3), ("7^n - 1", 6), ("n(n+1)(n+2)", 6),
              ("n^2(n^2 - 1)", 12), ("2^{2n} - 1", 3), ("n^7 - n", 42), ("5^n - 1", 4), ("3^{2n} - 1", 8))
_PROOF_LEADS = ("Prove that", "Show that", "Prove rigorously that", "Give a proof that", "Can you prove that",
                "Demonstrate that", "Prove or disprove:", "Show, with a complete argument, that")


def _statement(rng: random.Random) -> str:
    a, b, p = rng.randint(2, 9), rng.randint(1, 20), rng.choice([2, 3, 5, 7, 11, 13])
    expr, d = rng.choice(_DIVISIBLE)
    s = rng.randint(3, 12)
    return rng.choice((
        f"for every positive integer $n$, ${expr}$ is divisible by ${d}$.",
        f"$\\sqrt{{{p}}}$ is irrational.",
        "$1 + 2 + \\cdots + n = \\frac{n(n+1)}{2}$ for every positive integer $n$ (use induction).",
        f"there are infinitely many primes of the form ${a * 2}k + {1 if a % 2 else 2 * a - 1}$.",
        f"if $a, b, c > 0$ and $a + b + c = {s}$, then $ab + bc + ca \\le {s * s}/3$.",
        "the sum of the interior angles of a triangle is $180^\\circ$.",
        "if $n^2$ is even then $n$ is even.",
        "every tree with $n$ vertices has exactly $n - 1$ edges.",
        "$\\binom{2n}{n}$ is even for every $n \\ge 1$.",
        "$\\frac{x + y}{2} \\ge \\sqrt{xy}$ for all non-negative reals $x$ and $y$.",
        f"every group of order ${p}^2$ is abelian.",
        "a continuous function on a closed interval $[a, b]$ attains a maximum.",
        f"the function $f(x) = {a}x + {b}$ is a bijection from $\\mathbb{{R}}$ to $\\mathbb{{R}}$.",
        "$\\gcd(n, n + 1) = 1$ for every integer $n$.",
        "the set of rational numbers is countable.",
        f"$x^2 - {2 * a}x + {a * a} \\ge 0$ for every real number $x$.",
        "the sequence $a_n = \\frac{n}{n+1}$ converges to $1$ (use the epsilon definition).",
        "there is no largest prime number.",
        "in any group of six people there are three mutual friends or three mutual strangers.",
        f"the equation $x^2 - {p}y^2 = -1$ has no integer solutions when ${p} \\equiv 3 \\pmod 4$." if p % 4 == 3
        else f"the product of any {a} consecutive integers is divisible by ${a}!$.",
        "the diagonals of a parallelogram bisect each other.",
        "a polynomial of degree $d$ has at most $d$ real roots.",
        "$\\sum_{k=0}^{n} \\binom{n}{k} = 2^n$.",
        f"$2^n > n^{min(a, 3)}$ for all sufficiently large $n$, and find the smallest such $n$.",
        "the harmonic series $\\sum 1/n$ diverges.",
        "the angle subtended by a diameter at any point of a circle is a right angle.",
    ))


def proof_requests(n: int, seed: int) -> list[Example]:
    """``n`` requests for a proof ("Prove that ... is irrational."), source ``meswitch/proofs``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(_PROOF_LEADS)} {_statement(rng)}"
        if rng.random() < 0.2:
            text = text.replace("$", "")
        if rng.random() < 0.2:
            text += rng.choice((" Write the proof in full sentences.", " Use induction.", " Argue by contradiction.",
                                " Explain each step."))
        out.append(Example(text, "math", "", "meswitch/proofs"))
    return out


def _random_expr(rng: random.Random):
    import sympy as sp

    x = sp.Symbol(rng.choice("xxxtyz"))
    a, b, c = (sp.Integer(rng.choice([-5, -3, -2, -1, 1, 2, 3, 4, 5, 7])) for _ in range(3))
    parts = (a * x ** rng.randint(2, 4) + b * x + c, sp.sin(a * x) * sp.exp(b * x), sp.log(x ** 2 + abs(c)),
             (a * x + b) / (x ** 2 + abs(c)), sp.sqrt(abs(a) * x + abs(b)), x * sp.cos(x) + c,
             sp.exp(a * x) / (x + abs(b)), sp.atan(x / abs(a)), (x + a) ** rng.randint(2, 5), sp.tan(x) ** 2 + b)
    return x, rng.choice(parts) + (rng.choice(parts) if rng.random() < 0.3 else 0)


def symbolic_exercises(n: int, seed: int) -> list[Example]:
    """``n`` calculus and algebra exercises on random sympy expressions in LaTeX, source ``sympy/latex``."""
    import sympy as sp

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x, e = _random_expr(rng)
        tex, v = sp.latex(e), sp.latex(x)
        q = rng.choice((
            f"Differentiate $f({v}) = {tex}$ with respect to ${v}$.",
            f"Find $\\frac{{d}}{{d{v}}}\\left({tex}\\right)$.",
            f"Evaluate the integral $\\int {tex} \\, d{v}$.",
            f"Compute $\\lim_{{{v} \\to 0}} {tex}$.",
            f"Find the Taylor series of ${tex}$ about ${v} = 0$ up to the ${v}^{rng.randint(2, 4)}$ term.",
            f"Simplify the expression \\[ {tex} \\]",
            f"Solve ${tex} = 0$ for ${v}$.",
            f"Find the critical points of $g({v}) = {tex}$ and classify them.",
            f"Expand and simplify: ${sp.latex(sp.Symbol(v) * 0 + e)}$",
            f"Determine the second derivative of $y = {tex}$.",
            f"Evaluate $\\int_0^{{{rng.randint(1, 4)}}} {tex} \\, d{v}$ to three decimal places.",
            f"Is the function $h({v}) = {tex}$ increasing on $(0, \\infty)$? Explain.",
        ))
        out.append(Example(q, "math", "", "sympy/latex"))
    return out


_NAMES = ("Ava", "Liam", "Noah", "Sofia", "Mateo", "Priya", "Chen", "Fatima", "Olga", "Kwame", "Lucia", "Tom",
          "Hana", "Diego", "Amara", "Jonas", "Yuki", "Omar", "Grace", "Ravi")
_ITEMS = (("apples", "basket"), ("stickers", "sheet"), ("cupcakes", "tray"), ("marbles", "jar"), ("books", "shelf"),
          ("pencils", "box"), ("eggs", "carton"), ("seeds", "packet"), ("cards", "deck"), ("bottles", "crate"))


def _story(rng: random.Random) -> str:
    p, q = rng.sample(_NAMES, 2)
    item, box = rng.choice(_ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 12), rng.randint(2, 9)
    price, pct, speed, hours = rng.randint(2, 30), rng.choice([10, 15, 20, 25, 30, 40]), rng.randint(30, 90), c
    return rng.choice((
        f"{p} has {a} {item}. {q} gives {p} {b} more {box}s with {c} {item} in each. How many {item} does {p} have now?",
        f"A shop sells a {box} of {item} for ${price}. During a sale everything is {pct}% off. How much do {c} {box}s cost?",
        f"{p} drives at {speed} km per hour for {hours} hours, then at {speed - 10} km per hour for {b} more hours. How far "
        f"did {p} travel in total?",
        f"{p} is {a} years old and {q} is {b} years younger. In {c} years, what will the sum of their ages be?",
        f"It takes {p} {a} minutes to paint a fence and {q} {a + b} minutes. How long does it take if they work together?",
        f"{p} saves ${price} every week. {q} starts with ${a * 10} and saves ${max(1, price - b)} a week. After how many "
        f"weeks will they have the same amount?",
        f"A recipe for {c} people needs {b} cups of flour. {p} is cooking for {a} people. How many cups of flour are needed?",
        f"There are {a * c} {item} shared equally among {c} friends, and each friend eats {b % 3 + 1}. How many are left "
        "in total?",
        f"{p} reads {b} pages on Monday and twice as many each following day. How many pages has {p} read after {c} days?",
        f"A tank holds {a * 20} litres. A pipe fills it at {b + 3} litres per minute while another drains {b} litres per "
        "minute. How long does it take to fill the empty tank?",
        f"{p} bought {c} {box}s of {item} at ${price} each and sold every {item[:-1]} for ${b}. There were {a} {item} in "
        f"each {box}. What was {p}'s profit?",
        f"The ratio of boys to girls in a class is {b}:{c}. If there are {a + 20} students, how many are girls?",
        f"{p} scored {a + 50}, {b + 60} and {c + 70} on three tests. What must {p} score on the fourth test to average 80?",
        f"A train leaves at 9:{10 + a} and arrives at {c + 10}:{b + 20}. How long is the journey in minutes?",
        f"{p} spends a third of her money on {item} and half of the rest on a {box}. She has ${a * 6} left. How much "
        "did she start with?",
    ))


def story_problems(n: int, seed: int) -> list[Example]:
    """``n`` narrative word problems (people, shops, rates, ages), source ``meswitch/story_problems``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = _story(rng)
        if rng.random() < 0.3:
            q += rng.choice((" Show your work.", " Explain step by step.", " Give just the number.",
                             " Think it through before answering."))
        out.append(Example(q, "math", "", "meswitch/story_problems"))
    return out


_CONCEPTS = ("the derivative", "an integral", "a limit", "an eigenvalue", "a prime number", "a logarithm",
             "the Pythagorean theorem", "a matrix determinant", "standard deviation", "a Taylor series",
             "modular arithmetic", "a complex number", "the binomial theorem", "a vector space", "the chain rule",
             "Bayes' theorem", "a geometric series", "the fundamental theorem of calculus", "an irrational number",
             "a group in abstract algebra", "the law of large numbers", "a differential equation", "the dot product",
             "the quadratic formula", "conditional probability", "a bijection", "the mean value theorem")
_CONCEPT_ASKS = (
    "What is the intuition behind {c}?", "Explain {c} to me like I'm in high school.", "Why does {c} work?",
    "Can you give an example of {c} and explain it?", "How is {c} related to {d}?", "What is the difference "
    "between {c} and {d}?", "I never understood {c} in my math class. Can you help?", "When would I use {c}?",
    "Is there a geometric way to see {c}?", "What are common mistakes students make with {c}?",
    "Why is 0.999... equal to 1?", "Why can't we divide by zero?", "Why is the sum of the angles in a triangle "
    "180 degrees?", "how do you know when a series converges", "what's the point of imaginary numbers",
)


def math_concepts(n: int, seed: int) -> list[Example]:
    """``n`` conceptual questions about mathematics in prose, source ``meswitch/math_concepts``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, d = rng.sample(_CONCEPTS, 2)
        out.append(Example(rng.choice(_CONCEPT_ASKS).format(c=c, d=d), "math", "", "meswitch/math_concepts"))
    return out
