"""An offline Portuguese evaluation beyond perplexity: what a model has learned of the language.

Loss and perplexity say how well a model predicts the next token; these tasks ask about words and
grammar, built from the run's own held-out test split (no download, the same on Kaggle offline):

- **Last word** (in the manner of LAMBADA and CALAME-PT): a passage of the test split that ends just
  before a sentence's last word, a content word of at least four letters. The model sees up to
  `context_length` tokens before it. Scored by exact match of the greedy continuation (every token of
  the word, and then no more letters) and by the word's log-likelihood, beside a baseline that knows
  no context: the training split's word frequencies.
- **Agreement minimal pairs** (in the manner of BLiMP): a sentence of the test split, and the same
  sentence with one determiner changed so that it no longer agrees with its noun in gender
  (o/a, um/uma, este/esta, ...) or in number (o/os, a/as, ...). A pair is right when the model gives
  the original the higher probability; chance is 50%. Only nouns that the training split attests
  with one gender (or number) at least `MIN_ATTESTED` times and never with the other are used, so
  the altered sentence is wrong without a hand-made lexicon; each determiner pair is balanced (as
  many originals of each side), so a model that prefers one determiner regardless of the noun
  scores 50%.
- **Generation statistics** of greedy continuations of "lisboa" and of openings of test sentences:
  the share of generated words that occur in the training split, distinct-2/3, and repetition.

The items are drawn by a seeded procedure from the prepared splits, stored in `data/evalpack.json`
with a fingerprint and a version, and are the same for every arm, run and seed. `combined` centres
each task on chance ((accuracy - chance) / (1 - chance)) and averages them, as nanochat's CORE does.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from .evaluation import estimate
from .files import read_json, write_json
from .generate import generate
from .tokenizer import EOT_ID, decode, encode

PACK_VERSION = 1
MIN_ATTESTED = 5              # a noun's gender (number) is known when seen this often with one side only
ITEMS = {"last_word": 400, "gender": 400, "number": 400}
MIN_ITEMS = 40                # fewer: the task is left out with a warning
PROMPT_WORDS, GEN_PROMPTS, GEN_TOKENS = 4, 8, 40

# (gender, number) of each determiner, and the determiner that differs from it in one of the two.
_DETERMINERS = {  # masculine singular, feminine singular, masculine plural, feminine plural
    row[0]: row for row in [
        ("o", "a", "os", "as"), ("um", "uma", "uns", "umas"), ("este", "esta", "estes", "estas"),
        ("esse", "essa", "esses", "essas"), ("aquele", "aquela", "aqueles", "aquelas"),
        ("meu", "minha", "meus", "minhas"), ("teu", "tua", "teus", "tuas"), ("seu", "sua", "seus", "suas"),
        ("nosso", "nossa", "nossos", "nossas"), ("do", "da", "dos", "das"), ("no", "na", "nos", "nas"),
        ("pelo", "pela", "pelos", "pelas")]}
DETERMINER = {w: (("m", "f")[i % 2], ("sg", "pl")[i // 2], row) for row in _DETERMINERS.values()
              for i, w in enumerate(row)}
# Words that are often not determiners (a preposition, clitic pronouns) give no evidence of a
# noun's gender or number; sentences may still use them as determiners.
NOT_EVIDENCE = {"o", "a", "os", "as", "nos"}
# Frequent words of at least four letters that carry no content: never a last-word target.
FUNCTION_WORDS = set("""para pelo pela pelos pelas como mais quando onde porque pois porém mesmo mesma
mesmos mesmas este esta estes estas esse essa esses essas aquele aquela aqueles aquelas isto isso aquilo
qual quais quem cujo cuja muito muita muitos muitas pouco pouca tudo nada algo alguém ninguém todo toda
todos todas outro outra outros outras seus suas minha minhas nosso nossa teus tuas dele dela deles delas
nele nela neles nelas entre sobre contra desde até após ante sem também ainda então logo assim aqui ali
lá cá agora depois antes sempre nunca talvez apenas só seja sejam fosse fossem será serão havia houve
tinha tinham estava estavam era eram foram sido está estão são tem têm isso""".split())

_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --- the items --------------------------------------------------------------------------------------

def split_text(data_dir: Path, split: str) -> list[str]:
    """The documents of a prepared split, decoded back to text."""
    ids = np.fromfile(Path(data_dir) / f"{split}.bin", dtype=np.uint16)
    docs, start = [], 0
    for end in np.flatnonzero(ids == EOT_ID).tolist() + [len(ids)]:
        if end > start:
            docs.append(decode(ids[start:end].tolist()))
        start = end + 1
    return docs


def sentences(doc: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """A document's sentences on one line each, of a length a small model can be asked about."""
    out = []
    for s in _SENTENCE_END.split(doc):
        s = " ".join(s.split())
        if min_words <= len(s.split()) <= max_words and s[-1] in ".!?":
            out.append(s)
    return out


def training_lexicon(train_docs: list[str]) -> dict:
    """Word counts of the training split, and the nouns whose gender (number) it attests unambiguously."""
    words = collections.Counter()
    evidence = {"gender": collections.defaultdict(collections.Counter),
                "number": collections.defaultdict(collections.Counter)}
    for doc in train_docs:
        tokens = _WORD.findall(doc)
        words.update(t.lower() for t in tokens)
        for det, noun in zip(tokens, tokens[1:]):
            d = det.lower()
            if d in DETERMINER and d not in NOT_EVIDENCE and noun.islower():
                gender, number, _ = DETERMINER[d]
                evidence["gender"][noun][gender] += 1
                evidence["number"][noun][number] += 1
    known = {kind: {noun: next(iter(c)) for noun, c in ev.items() if len(c) == 1 and sum(c.values()) >= MIN_ATTESTED}
             for kind, ev in evidence.items()}
    return {"words": words, **known}


def _swap(det: str, kind: str) -> str:
    """The determiner that differs from `det` in gender (or number) only, in `det`'s capitalisation."""
    gender, number, row = DETERMINER[det.lower()]
    g = {"m": "f", "f": "m"}[gender] if kind == "gender" else gender
    n = {"sg": "pl", "pl": "sg"}[number] if kind == "number" else number
    new = row[("m", "f").index(g) + 2 * ("sg", "pl").index(n)]
    return new.capitalize() if det[0].isupper() else new


def agreement_items(test_sentences: list[str], lexicon: dict, kind: str, n: int, rng: random.Random) -> list[dict]:
    """Minimal pairs for `kind` ("gender" or "number"): one per sentence, at its first determiner
    followed by a noun of known gender (number) that agrees with it. Drawn in twos, one original of
    each side of a determiner pair (o and a, o and os, ...), so that every pair is balanced."""
    genders, numbers = lexicon["gender"], lexicon["number"]
    by_side = collections.defaultdict(list)     # (determiner row, side) -> candidate items
    for s in test_sentences:
        words = list(_WORD.finditer(s))
        for det, noun in zip(words, words[1:]):
            info, w = DETERMINER.get(det.group().lower()), noun.group()
            if info is None or s[det.end():noun.start()] != " ":
                continue
            # The original agrees in gender and in number with a noun the training split attests in
            # both (which also keeps out "a" the preposition and "o" the pronoun before a verb).
            if (genders.get(w), numbers.get(w)) != info[:2]:
                continue
            side = info[0] if kind == "gender" else info[1]
            altered = s[:det.start()] + _swap(det.group(), kind) + s[det.end():]
            by_side[(info[2][0], side)].append({"good": s, "bad": altered, "determiner": det.group(),
                                                "noun": noun.group()})
            break
    sides = ("m", "f") if kind == "gender" else ("sg", "pl")
    pairs = []
    for row in sorted({row for row, _ in by_side}):
        k = min(len(by_side[(row, side)]) for side in sides)
        pairs += zip(rng.sample(by_side[(row, sides[0])], k), rng.sample(by_side[(row, sides[1])], k))
    rng.shuffle(pairs)
    items = [it for pair in pairs[:n // 2] for it in pair]
    rng.shuffle(items)
    return items


def last_word_items(test_docs: list[str], lexicon: dict, n: int, rng: random.Random) -> list[dict]:
    """Passages ending just before a sentence's last word (a content word of four letters or more)."""
    found = []
    for doc in test_docs:
        for m in re.finditer(r"(?<=\S) ([^\W\d_]{4,})(?=[.!?](\s|$))", doc):
            word = m.group(1)
            if word.islower() and word not in FUNCTION_WORDS:
                found.append({"context": doc[max(0, m.start() - 1500):m.start()], "word": word})
    return rng.sample(found, min(n, len(found)))


def generation_prompts(test_sentences: list[str], rng: random.Random) -> list[str]:
    starts = [" ".join(s.split()[:PROMPT_WORDS]) for s in rng.sample(test_sentences, min(GEN_PROMPTS, len(test_sentences)))]
    return ["lisboa", *starts]


def build_items(data_dir: Path, seed: int, context_length: int) -> dict:
    """Every task's items from the prepared splits (the test split's text; the training split's words).
    Sentences are kept when they fit a window of `context_length` tokens after the start token."""
    rng = random.Random(seed)
    test_docs = split_text(data_dir, "test")
    test_sentences = [s for d in test_docs for s in sentences(d) if len(encode(s)) < context_length - 1]
    lexicon = training_lexicon(split_text(data_dir, "train"))
    words = lexicon["words"]
    last = last_word_items(test_docs, lexicon, ITEMS["last_word"], rng)
    # The baseline that knows no context: the training split's word frequencies (add-one smoothed).
    total, vocab = sum(words.values()), len(words)
    content = [(c, w) for w, c in words.items() if len(w) >= 4 and w not in FUNCTION_WORDS]
    top = max(content)[1] if content else ""
    for it in last:
        it["unigram_log_prob"] = math.log((words.get(it["word"].lower(), 0) + 1) / (total + vocab))
    items = {"version": PACK_VERSION, "seed": seed, "context_length": context_length, "last_word": last,
             "gender": agreement_items(test_sentences, lexicon, "gender", ITEMS["gender"], rng),
             "number": agreement_items(test_sentences, lexicon, "number", ITEMS["number"], rng),
             "prompts": generation_prompts(test_sentences, rng) if test_sentences else ["lisboa"],
             "lexicon": {"gender_nouns": len(lexicon["gender"]), "number_nouns": len(lexicon["number"]),
                         "min_attested": MIN_ATTESTED, "training_words": total},
             "baseline_word": top, "training_vocabulary": sorted(words)}
    items["fingerprint"] = hashlib.sha256(json.dumps({k: items[k] for k in ("last_word", "gender", "number", "prompts")},
                                                     ensure_ascii=False).encode()).hexdigest()[:16]
    return items


def load_items(data_dir: str | Path, seed: int, context_length: int) -> dict:
    """The items of this data folder, built once and kept in data/evalpack.json."""
    path = Path(data_dir) / "evalpack.json"
    if path.exists():
        items = read_json(path, f"delete {path.name}: it is rebuilt from the prepared splits")
        if (items.get("version"), items.get("seed"), items.get("context_length")) == (PACK_VERSION, seed, context_length):
            return items
    items = build_items(Path(data_dir), seed, context_length)
    write_json(path, items)
    return items


# --- scoring ---------------------------------------------------------------------------------------------

def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _padded(seqs: list[list[int]], device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [EOT_ID] * (width - len(s)) for s in seqs], device=device)


@torch.no_grad()
def sequence_log_probs(model, seqs: list[list[int]], device, batch_size: int = 16) -> np.ndarray:
    """log p(sequence) of each token sequence, each read after the end-of-text token that starts documents."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))     # batches of like lengths: little padding
    out = np.empty(len(seqs))
    for idx in _batches(order, batch_size):
        batch = [seqs[i] for i in idx]
        x = _padded([[EOT_ID] + s[:-1] for s in batch], device)
        y = _padded(batch, device)
        nll = model(x, y, per_token=True).loss.double()
        mask = torch.tensor([[j < len(s) for j in range(y.shape[1])] for s in batch], device=device)
        out[idx] = (-(nll * mask).sum(dim=1)).cpu().numpy()
    return out


@torch.no_grad()
def score_last_word(model, items: list[dict], context_length: int, device, batch_size: int = 16) -> dict:
    """Exact match of the greedy continuation and the word's log-likelihood, item by item."""
    correct, log_likelihood = [], []
    for batch in _batches(items, batch_size):
        targets = [encode(" " + it["word"]) for it in batch]
        contexts = [encode(it["context"])[-(context_length - len(t)):] for it, t in zip(batch, targets)]
        x = _padded([c + t for c, t in zip(contexts, targets)], device)
        k = max(len(t) for t in targets) + 1        # each target token, and the one after the word
        positions = torch.tensor([[min(len(c) - 1 + j, len(c) + len(t) - 1) for j in range(k)]
                                  for c, t in zip(contexts, targets)], device=device)
        logp = model.logits_at(x, positions).float().log_softmax(dim=-1)
        greedy = logp.argmax(dim=-1).tolist()
        for row, t in enumerate(targets):
            after = decode([greedy[row][len(t)]])
            correct.append(float(greedy[row][:len(t)] == t and not after[:1].isalpha()))
            log_likelihood.append(float(sum(logp[row, j, t[j]] for j in range(len(t)))))
    return {"correct": correct, "log_likelihood": log_likelihood}


def score_pairs(model, items: list[dict], device) -> list[float]:
    """1 where the original sentence is the more probable, 0 where the altered one is (0.5: a tie)."""
    good = sequence_log_probs(model, [encode(it["good"]) for it in items], device)
    bad = sequence_log_probs(model, [encode(it["bad"]) for it in items], device)
    return np.where(good > bad, 1.0, np.where(good == bad, 0.5, 0.0)).tolist()


def generation_stats(texts: list[str], vocabulary: set[str]) -> dict:
    """Share of generated words the training split has, distinct n-grams, and repeated 3-grams."""
    samples = [[w.lower() for w in _WORD.findall(t)] for t in texts]
    words = [w for s in samples for w in s]

    def grams(s, n):
        return [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
    stats = {"samples": len(texts), "words": len(words),
             "in_vocabulary": sum(w in vocabulary for w in words) / len(words) if words else math.nan}
    for n in (2, 3):
        all_grams = [g for s in samples for g in grams(s, n)]
        stats[f"distinct_{n}"] = len(set(all_grams)) / len(all_grams) if all_grams else math.nan
    repeated = total = 0
    for s in samples:
        seen = set()
        for g in grams(s, 3):
            repeated += g in seen
            total += 1
            seen.add(g)
    stats["repetition"] = repeated / total if total else math.nan
    return stats


TASKS = {"last_word": ("last word (exact match)", 0.0), "gender": ("gender agreement", 0.5),
         "number": ("number agreement", 0.5)}     # task -> (label, chance)


def evaluate(model, data_dir: str | Path, cfg, device, log=print) -> dict:
    """Every task on `model` (in eval mode for the duration); the results as stored in the metrics."""
    t0 = time.perf_counter()
    items = load_items(data_dir, cfg.eval_seed, cfg.context_length)
    was_training = model.training
    model.eval()
    results = {"version": PACK_VERSION, "fingerprint": items["fingerprint"], "lexicon": items["lexicon"],
               "tasks": {}, "warnings": []}
    try:
        for task, (label, chance) in TASKS.items():
            n = len(items[task])
            if n < MIN_ITEMS:
                results["warnings"].append(f"{label}: the test split gives only {n} items (fewer than {MIN_ITEMS}); "
                                           "the task is left out")
                continue
            if task == "last_word":
                scored = score_last_word(model, items[task], cfg.context_length, device)
                correct = scored["correct"]
                extra = {"log_likelihood": float(np.mean(scored["log_likelihood"])),
                         "baseline_log_likelihood": float(np.mean([it["unigram_log_prob"] for it in items[task]])),
                         "baseline_accuracy": float(np.mean([it["word"] == items["baseline_word"] for it in items[task]])),
                         "baseline_word": items["baseline_word"]}
            else:
                correct, extra = score_pairs(model, items[task], device), {}
            low, high = wilson(sum(correct), n)
            results["tasks"][task] = {"label": label, "accuracy": float(np.mean(correct)), "ci": [low, high], "n": n,
                                      "chance": chance, **extra, "correct": correct}
        texts = [generate(model, encode(p), GEN_TOKENS, eos_id=EOT_ID)[0, len(encode(p)):].tolist()
                 for p in items["prompts"]]
        results["generation"] = generation_stats([decode(t) for t in texts], set(items["training_vocabulary"]))
    finally:
        model.train(was_training)
    results["combined"] = combined_score(results["tasks"])
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for w in results["warnings"]:
        log(f"warning: {w}")
    return results


def combined_score(tasks: dict) -> float:
    """Each task's accuracy centred on chance ((accuracy - chance) / (1 - chance)), averaged: 0 is
    chance everywhere, 1 every item right."""
    centred = [(t["accuracy"] - t["chance"]) / (1 - t["chance"]) for t in tasks.values()]
    return float(np.mean(centred)) if centred else math.nan


def paired_accuracy(a: dict, b: dict, task: str):
    """b's accuracy minus a's on the same items, with its paired 95% interval (evaluation.estimate)."""
    x, y = np.asarray(a["tasks"][task]["correct"]), np.asarray(b["tasks"][task]["correct"])
    return estimate(y - x)


def main(argv=None) -> int:
    """Score a checkpoint (or the untrained model) of a run directory, and with --write add the scores
    of a finished run's final checkpoint to its metrics (for runs trained before this evaluation):
    python -m llm_nb_utils.langeval --run-dir outputs/run-small --arm gpt2 [--checkpoint PATH | --untrained] [--write]"""
    import argparse
    from .arms import ARM_NAMES, build_model
    from .checkpoint import load_checkpoint
    from .config import Config
    from .runfolder import RunFolder
    p = argparse.ArgumentParser(prog="python -m llm_nb_utils.langeval", description=main.__doc__)
    p.add_argument("--run-dir", required=True, help="a run directory (its data/ and checkpoints/)")
    p.add_argument("--arm", required=True, choices=ARM_NAMES)
    p.add_argument("--checkpoint", default="", help="a checkpoint file (default: the arm's latest)")
    p.add_argument("--untrained", action="store_true", help="the arm as initialised, with the checkpoint's settings")
    p.add_argument("--write", action="store_true", help="add the scores to metrics/<arm>.json (final checkpoint only)")
    args = p.parse_args(argv)
    folder = RunFolder(args.run_dir)
    path = Path(args.checkpoint) if args.checkpoint else folder.latest_checkpoint(args.arm)
    if path is None:
        raise SystemExit(f"error: no checkpoint of {args.arm} in {folder.checkpoints(args.arm)}")
    ck = load_checkpoint(path)
    cfg = Config.from_dict(ck["config"])
    model = build_model(args.arm, cfg)
    if not args.untrained:
        model.load_state_dict(ck["model"])
    r = evaluate(model, folder.data, cfg, torch.device("cpu"))
    if args.write:
        metrics = folder.load_metrics(args.arm)
        if args.untrained or ck["state"]["step"] != metrics["steps"]:
            raise SystemExit(f"error: --write takes the run's final checkpoint (step {metrics['steps']}), not {path.name}")
        metrics["language"] = {**r, "computed": "after training, from the final checkpoint"}
        metrics["warnings"] = [*metrics.get("warnings", []), *r["warnings"]]
        folder.write_metrics(metrics)
    what = "untrained" if args.untrained else f"step {ck['state']['step']}"
    print(json.dumps({"arm": args.arm, "model": what, "items": r["fingerprint"], "seconds": r["seconds"],
                      **{t: {k: v[k] for k in v if k not in ("correct", "label")} for t, v in r["tasks"].items()},
                      "combined": r["combined"], "generation": r["generation"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
