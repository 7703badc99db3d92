"""General (non-math, non-code) requests made from packaged prose and meswitch's own word lists.

- ``fiction_tasks``: passages of the Project Gutenberg story that reasoning-gym ships
  (``in_the_year_2889.txt``) under a reading or writing task ("Summarize this passage", "What is
  the tone of ...", "Continue the story");
- ``knowledge_questions``: questions about history, science, culture, health and everyday life
  ("Why did the Roman Empire fall?", "Explain how vaccines work to a teenager"), some as a
  four-option multiple-choice question.
"""

from __future__ import annotations

import random
import re

from meswitch.data.examples import Example

_READING_TASKS = (
    "Summarize this passage in two sentences:", "What is the tone of the following text?",
    "Rewrite this paragraph in modern, plain English:", "Continue this story for one more paragraph:",
    "Who are the characters in this passage and what do they want?", "Translate this passage into French:",
    "Give this excerpt a title:", "What does the author predict about the future here?",
    "Explain the main idea of this text to a child:", "Is this passage optimistic or pessimistic? Why?",
)


def _passages(text: str) -> list[str]:
    body = text.split("*** START", 1)[-1].split("*** END", 1)[0]
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return [p for p in paras if 120 <= len(p) <= 900 and not p.isupper()]


def fiction_tasks(n: int, seed: int) -> list[Example]:
    """``n`` reading/writing tasks over passages of a packaged story, source ``gutenberg/tasks``."""
    from meswitch.data.sources import _package_dir

    path = _package_dir("reasoning_gym", "reasoning-gym") / "data" / "in_the_year_2889.txt"
    paras = _passages(path.read_text(encoding="utf-8", errors="replace"))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.choice(paras)
        task = rng.choice(_READING_TASKS)
        out.append(Example(f"{task}\n\n{p}" if rng.random() < 0.7 else f"{p}\n\n{task}", "general", "",
                           "gutenberg/tasks"))
    return out


_TOPICS = (
    "the fall of the Roman Empire", "photosynthesis", "the French Revolution", "how vaccines work", "jazz music",
    "the causes of World War I", "the water cycle", "Impressionist painting", "the immune system", "climate change",
    "the Silk Road", "plate tectonics", "the Renaissance", "black holes", "the printing press", "sleep and memory",
    "the Cold War", "the human heart", "Greek mythology", "the Industrial Revolution", "volcanoes", "inflation",
    "the Olympic Games", "honeybees", "the Great Wall of China", "meditation", "the stock market", "Shakespeare's "
    "tragedies", "the Amazon rainforest", "democracy in ancient Athens", "coffee", "the moon landing",
    "the civil rights movement", "dinosaurs", "minimalism", "the Cuban Missile Crisis", "tea ceremonies in Japan",
    "antibiotic resistance", "the Byzantine Empire", "the Northern Lights", "supply and demand", "baroque music",
)
_ASKS = (
    "Explain {t} in simple terms.", "What should everyone know about {t}?", "Give me a short overview of {t}.",
    "Why is {t} important?", "Tell me three surprising facts about {t}.", "How would you describe {t} to a "
    "ten-year-old?", "What are the main debates about {t}?", "Write a short paragraph about {t}.",
    "what's the deal with {t}?", "Can you recommend a book about {t}?", "Compare {t} and {u}.",
    "What is the connection between {t} and {u}?", "I have an exam on {t} tomorrow, what are the key points?",
)
_MCQ = (
    ("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Mercury"]),
    ("Who wrote 'Pride and Prejudice'?", ["Jane Austen", "Charlotte Bronte", "Mary Shelley", "George Eliot"]),
    ("What is the largest organ of the human body?", ["the liver", "the skin", "the brain", "the lungs"]),
    ("In which city is the Colosseum?", ["Athens", "Rome", "Istanbul", "Madrid"]),
    ("Which gas do plants absorb from the air?", ["oxygen", "nitrogen", "carbon dioxide", "helium"]),
    ("Which empire built Machu Picchu?", ["the Aztec", "the Maya", "the Inca", "the Olmec"]),
    ("What is the main language spoken in Brazil?", ["Spanish", "Portuguese", "French", "English"]),
    ("Which organ pumps blood through the body?", ["the kidney", "the heart", "the stomach", "the spleen"]),
    ("Who painted the Mona Lisa?", ["Michelangelo", "Raphael", "Leonardo da Vinci", "Donatello"]),
    ("Which ocean is the largest?", ["the Atlantic", "the Indian", "the Pacific", "the Arctic"]),
    ("What did the Treaty of Versailles end?", ["World War I", "the Thirty Years' War", "the Napoleonic Wars",
                                                 "the Crimean War"]),
    ("Which instrument has 88 keys?", ["the organ", "the piano", "the harpsichord", "the accordion"]),
)


def knowledge_questions(n: int, seed: int) -> list[Example]:
    """``n`` questions about the world (open or multiple choice), source ``meswitch/knowledge``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            q, options = rng.choice(_MCQ)
            opts = rng.sample(options, len(options))
            text = q + "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))
            if rng.random() < 0.5:
                text += "\nAnswer:"
        else:
            t, u = rng.sample(_TOPICS, 2)
            text = rng.choice(_ASKS).format(t=t, u=u)
        out.append(Example(text, "general", "", "meswitch/knowledge"))
    return out
