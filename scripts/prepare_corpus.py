#!/usr/bin/env python3
"""Build the English training corpus for the project's tiny OLMoE from Debian packages.

Every source is a Debian (bookworm) package whose licence allows redistribution;
nothing is fetched from the web. Install the sources once (as root):

    apt-get update
    apt-get install -y wordnet-base bible-kjv bible-kjv-text python3.11-doc dict-devil

Then run (from the repository root; standard library only, any Python >= 3.9):

    python3 scripts/prepare_corpus.py            # writes data/corpus/ and data/heldout.txt

Sources (see data/CORPUS.md for versions and licences):
  * wordnet-base   WordNet 3.0 synsets rendered as short English sentences
                   (lemma + gloss + usage examples), grouped 40 synsets per document.
  * bible-kjv(-text) King James Version of the Bible, one chapter per document
                   (text dumped with the package's own `bible` program).
  * python3.11-doc reStructuredText sources of the Python 3.11 documentation
                   (html/_sources/*.rst.txt), lightly de-marked-up, split at
                   top-level sections into documents of at most ~24 KB.
  * dict-devil     Ambrose Bierce, The Devil's Dictionary (public domain),
                   40 entries per document.

Split: by document, per source, with a fixed seed (random.Random(SEED)); a source's
documents are shuffled and taken into the held-out set until it holds
HELDOUT_FRAC of the source's bytes, then into the validation set until VAL_FRAC,
the rest is training. Output (documents separated by a line holding only
"<|endoftext|>", which is also the tokenizer's end-of-text token):

    data/corpus/train.txt    training documents           (git-ignored)
    data/corpus/val.txt      validation documents, used only for checkpoint
                             selection while training       (git-ignored)
    data/corpus/heldout.txt  copy of data/heldout.txt       (git-ignored)
    data/corpus/stats.json   byte / document counts per source and split
    data/heldout.txt         held-out documents, never used in training (committed)
    data/CORPUS.md           sources, package versions, licences, counts (committed)

The output depends only on the installed package versions (recorded in CORPUS.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

SEED = 20240917
HELDOUT_FRAC = 0.015
VAL_FRAC = 0.01
DOC_SEP = "\n<|endoftext|>\n"
ROOT = Path(__file__).resolve().parent.parent

WORDNET_DIR = Path("/usr/share/wordnet")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")

SOURCES = {
    # name: (debian packages, licence summary)
    "wordnet": (["wordnet-base"], "WordNet 3.0 licence (permissive, BSD-like; keep the copyright notice)"),
    "kjv": (["bible-kjv-text", "bible-kjv"], "Public domain text (KJV, 1611); package data: unrestricted use"),
    "pydoc": (["python3.11-doc"], "PSF License Agreement (documentation); code examples Zero-Clause BSD"),
    "devil": (["dict-devil"], "Public domain (The Devil's Dictionary, Ambrose Bierce, 1911)"),
}


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = text.replace("<|endoftext|>", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ----------------------------------------------------------------------------- WordNet
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def _wn_lemma(word: str) -> str:
    word = re.sub(r"\([a-z]+\)$", "", word)  # adjective markers like (a), (p), (ip)
    return word.replace("_", " ")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def wordnet_synset_text(line: str) -> str | None:
    if line.startswith("  "):  # licence header
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    ss_type = f[2]
    w_cnt = int(f[3], 16)
    words = [_wn_lemma(f[4 + 2 * i]) for i in range(w_cnt)]
    gloss = gloss.strip()
    # gloss = definition(s) ; "example" ; "example"
    parts = [p.strip() for p in re.split(r';\s*(?=")', gloss)]
    definition = parts[0].rstrip(";").strip()
    examples = [p.strip().strip(";").strip() for p in parts[1:] if p.startswith('"')]
    head_word = words[0]
    pos = POS_NAME[ss_type]
    if pos == "noun":
        s = f"{_cap(head_word)} is {definition}."
    elif pos == "verb":
        if definition.startswith(("to ", "(")):
            s = f"To {head_word}: {definition}."
        else:
            s = f"To {head_word} means to {definition}."
    else:
        s = f"{_cap(head_word)} ({pos}) means {definition}."
    if len(words) > 1:
        s += " Also: " + ", ".join(words[1:]) + "."
    for ex in examples:
        ex = ex.strip('"').strip()
        if ex:
            s += f' For example: "{ex}"'
    s = s.replace("..", ".")
    return s


def wordnet_documents(per_doc: int = 40) -> list[str]:
    docs = []
    for pos in ["noun", "verb", "adj", "adv"]:
        # synsets are grouped by lexicographer file, then by offset
        by_lex: dict[str, list[tuple[int, str]]] = {}
        with open(WORDNET_DIR / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                t = wordnet_synset_text(line.rstrip("\n"))
                if t is None:
                    continue
                f = line.split()
                by_lex.setdefault(f[1], []).append((int(f[0]), t))
        for lex in sorted(by_lex):
            items = [t for _, t in sorted(by_lex[lex])]
            for i in range(0, len(items), per_doc):
                docs.append("\n".join(items[i : i + per_doc]))
    return docs


# ----------------------------------------------------------------------------- KJV
def kjv_documents() -> list[str]:
    out = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    docs, cur = [], []
    for line in out.split("\n"):
        if re.match(r"^\S.* \d+$", line) and not line.startswith(" "):  # "Genesis 1"
            if cur:
                docs.append("\n".join(cur))
            cur = [line.strip()]
        elif line.strip():
            m = re.match(r"^\s*(\d+) (.*)$", line)
            cur.append(f"{m.group(1)} {m.group(2).strip()}" if m else line.strip())
    if cur:
        docs.append("\n".join(cur))
    return docs


# ----------------------------------------------------------------------------- Python docs
_ROLE = re.compile(r":[a-zA-Z:+-]+:`([^`]*)`")
_HEADING_UNDERLINE = re.compile(r"^([=\-~*^#\"+'`.:_])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([a-zA-Z:-]+)::\s*(.*)$")
# directives dropped with their indented body
_SKIPPED_DIRECTIVES = frozenset(
    "index toctree highlight sectionauthor moduleauthor testsetup testcleanup raw only image figure "
    "tabularcolumns csv-table literalinclude include audit-event impl-detail opcode".split()
)
_VERSION_LABELS = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
}
_ADMONITIONS = frozenset("note warning seealso tip important attention caution hint".split())
# directive lines dropped, their (code) body kept
_CODE_DIRECTIVES = frozenset(
    "code-block sourcecode doctest testcode testoutput productionlist code parsed-literal".split()
)


def _role_text(m: re.Match) -> str:
    t = m.group(1).lstrip("!")
    mm = re.match(r"^(.*?)\s*<[^>]*>$", t, re.S)
    if mm and mm.group(1):
        return mm.group(1)
    if t.startswith("~"):
        t = t[1:].split(".")[-1]
    return t


def _directive_text(indent: str, name: str, arg: str) -> str | None:
    """The line a kept directive becomes (None: nothing)."""
    if name in _VERSION_LABELS:
        return f"{indent}{_VERSION_LABELS[name]} {arg.split()[0] if arg else ''}.".rstrip()
    if name in _ADMONITIONS:
        return f"{indent}{_cap(name) if name != 'seealso' else 'See also'}: {arg}".rstrip()
    if name in _CODE_DIRECTIVES:
        return None
    # function/class/data/method/module/... signatures: keep the argument text
    return indent + arg if arg else None


def rst_to_text(src: str) -> str:
    lines = src.split("\n")
    out: list[str] = []
    skip_indent = None  # skipping an indented directive body
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped == "" or indent > skip_indent:
                continue
            skip_indent = None
        if _HEADING_UNDERLINE.match(line):
            continue
        m = _DIRECTIVE.match(line)
        if m:
            if m.group(2) in _SKIPPED_DIRECTIVES:
                skip_indent = indent
                continue
            text = _directive_text(m.group(1), m.group(2), m.group(3).strip())
            if text is not None:
                out.append(text)
            continue
        if re.match(r"^\s*\.\.\s+_[^:]*:\s*$", line) or re.match(r"^\s*\.\.\s+\|", line):
            continue  # labels, substitutions
        if re.match(r"^\s*\.\.\s*$", line) or re.match(r"^\s*\.\.\s+[^\s]", line) and "::" not in line:
            # comment
            skip_indent = indent
            continue
        if re.match(r"^\s*:[a-zA-Z-]+:", line) and not _ROLE.match(line.strip()):
            continue  # directive options like :noindex:
        line = _ROLE.sub(_role_text, line)
        line = line.replace("``", "")
        line = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", line)
        line = re.sub(r"`([^`]+)`_+", r"\1", line)
        line = re.sub(r"\s+::$", "", line)
        line = re.sub(r"(\S)::$", r"\1:", line)
        if stripped == "::":
            continue
        out.append(line)
    return "\n".join(out)


def pydoc_documents(max_bytes: int = 24000) -> list[str]:
    docs = []
    files = sorted(PYDOC_DIR.rglob("*.rst.txt"))
    for f in files:
        rel = f.relative_to(PYDOC_DIR).as_posix()
        if rel.startswith(("whatsnew/changelog", "license", "copyright", "bugs", "about")):
            continue
        raw = f.read_text(encoding="utf-8")
        # split at top-level section headings (a line followed by an underline of =, -)
        src_lines = raw.split("\n")
        sections, cur = [], []
        for i, line in enumerate(src_lines):
            nxt = src_lines[i + 1] if i + 1 < len(src_lines) else ""
            if (
                line.strip()
                and re.match(r"^[=\-]{4,}\s*$", nxt)
                and len(nxt.strip()) >= len(line.strip()) - 2
                and sum(len(x) for x in cur) > 2000
            ):
                sections.append("\n".join(cur))
                cur = []
            cur.append(line)
        sections.append("\n".join(cur))
        buf = ""
        for sec in sections:
            text = normalise(rst_to_text(sec))
            if not text:
                continue
            if buf and len(buf) + len(text) > max_bytes:
                docs.append(buf)
                buf = ""
            buf = (buf + "\n\n" + text) if buf else text
            while len(buf) > max_bytes:  # very long single section: cut at a paragraph
                cut = buf.rfind("\n\n", 0, max_bytes)
                cut = cut if cut > max_bytes // 4 else max_bytes
                docs.append(buf[:cut].strip())
                buf = buf[cut:].strip()
        if buf:
            docs.append(buf)
    return docs


# ----------------------------------------------------------------------------- Devil's Dictionary
def devil_documents(per_doc: int = 40) -> list[str]:
    raw = gzip.open(DEVIL_DICT, "rt", encoding="utf-8", errors="replace").read()
    # dictd format: entries start with an unindented headword line, body indented
    entries, cur = [], []
    for line in raw.split("\n"):
        if line.startswith("00-database") or line.startswith("00database"):
            continue
        if line and not line.startswith((" ", "\t")) and re.match(r"^[A-Z][A-Z' ,.-]*(,|$)", line):
            if cur:
                entries.append("\n".join(cur))
            cur = [line.strip()]
        elif cur is not None:
            cur.append(line.strip())
    if cur:
        entries.append("\n".join(cur))
    entries = [re.sub(r"\n{2,}", "\n", e).strip() for e in entries if len(e) > 20]
    # drop the header entries of the dictd database
    entries = [e for e in entries if "dictd" not in e.lower() and "00-database" not in e]
    return ["\n\n".join(entries[i : i + per_doc]) for i in range(0, len(entries), per_doc)]


# ----------------------------------------------------------------------------- main
def deb_version(pkg: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], check=True, capture_output=True, text=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def split_docs(docs: list[str], rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    total = sum(len(d.encode()) for d in docs)
    order = list(range(len(docs)))
    rng.shuffle(order)
    held, val, train = [], [], []
    hb = vb = 0
    for i in order:
        n = len(docs[i].encode())
        if hb < HELDOUT_FRAC * total:
            held.append(i)
            hb += n
        elif vb < VAL_FRAC * total:
            val.append(i)
            vb += n
        else:
            train.append(i)
    # keep the original order inside each split (readability; training shuffles anyway)
    return ([docs[i] for i in sorted(train)], [docs[i] for i in sorted(val)], [docs[i] for i in sorted(held)])


def build_splits() -> tuple[dict[str, list[str]], dict]:
    """Documents of every source, split per source into train / val / heldout; and their statistics."""
    builders = {"wordnet": wordnet_documents, "kjv": kjv_documents, "pydoc": pydoc_documents, "devil": devil_documents}
    splits = {"train": [], "val": [], "heldout": []}
    stats: dict = {"seed": SEED, "heldout_frac": HELDOUT_FRAC, "val_frac": VAL_FRAC, "sources": {}}
    for k, (name, build) in enumerate(builders.items()):
        docs = [normalise(d) for d in build()]
        docs = [d for d in docs if len(d) >= 200]
        rng = random.Random(SEED + k)
        tr, va, he = split_docs(docs, rng)
        splits["train"] += tr
        splits["val"] += va
        splits["heldout"] += he
        pk, lic = SOURCES[name]
        stats["sources"][name] = {
            "packages": {p: deb_version(p) for p in pk},
            "licence": lic,
            "documents": {"train": len(tr), "val": len(va), "heldout": len(he)},
            "bytes": {
                s: sum(len(d.encode()) + len(DOC_SEP) for d in v)
                for s, v in (("train", tr), ("val", va), ("heldout", he))
            },
        }
        print(
            f"{name:8s} docs={len(docs):6d} train={len(tr)} val={len(va)} heldout={len(he)} "
            f"bytes={sum(len(d.encode()) for d in docs):,}",
            file=sys.stderr,
        )
    return splits, stats


def write_outputs(out: Path, splits: dict[str, list[str]], stats: dict) -> None:
    """The split files, data/heldout.txt, stats.json (with each split's size and hash) and CORPUS.md."""
    for s, docs in splits.items():
        text = DOC_SEP.join(docs) + "\n"
        (out / "corpus" / f"{s}.txt").write_text(text, encoding="utf-8")
        stats[s] = {
            "documents": len(docs),
            "bytes": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    (out / "heldout.txt").write_text(DOC_SEP.join(splits["heldout"]) + "\n", encoding="utf-8")
    (out / "corpus" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_corpus_md(out / "CORPUS.md", stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "data"), help="data directory (default: data/)")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    splits, stats = build_splits()
    write_outputs(out, splits, stats)
    print(json.dumps({s: stats[s] for s in splits}, indent=2), file=sys.stderr)


# The part of data/CORPUS.md that does not depend on the build's statistics.
CORPUS_MD_RENDERING_AND_LICENCES = """## What each source contributes and how it is rendered
- **wordnet**: every WordNet 3.0 synset as one line: `<Lemma> is <gloss>.` (nouns),
  `To <lemma> means to <gloss>.` (verbs), `<Lemma> (adjective) means <gloss>.`, followed by
  `Also: <synonyms>.` and `For example: "<usage example>"`. 40 synsets of one lexicographer file per
  document. Example: `Paris is the capital and largest city of France; ...`
- **kjv**: the King James Version dumped with the package's `bible` program, one chapter per document,
  verses as `<n> <text>`.
- **pydoc**: the reStructuredText sources shipped in `/usr/share/doc/python3.11/html/_sources`, with
  roles, directives, labels and heading underlines stripped (code examples kept), cut at section
  boundaries into documents of at most ~24 KB. `whatsnew/changelog`, license, copyright, bugs and about
  pages are left out.
- **devil**: entries of Ambrose Bierce's *The Devil's Dictionary* (dictd format), 40 per document.

## Licences and redistribution of `data/heldout.txt`
- WordNet 3.0: "Permission to use, copy, modify and distribute this software and database and its
  documentation for any purpose and without fee or royalty is hereby granted", provided the notice is
  kept: *WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.* THIS SOFTWARE AND
  DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS
  OR IMPLIED. (full text: `/usr/share/doc/wordnet-base/copyright`).
- King James Version: public domain; the Debian package's data file is "provided for unrestricted use"
  (Chip Chapin, 1989; `/usr/share/doc/bible-kjv-text/copyright`).
- Python 3.11 documentation: Copyright (c) 2001-2023 Python Software Foundation; licensed under the
  PSF License Agreement, code examples under the Zero-Clause BSD licence
  (`/usr/share/doc/python3.11/html/license.html`). The held-out slice is an excerpt, modified by
  stripping reStructuredText markup.
- The Devil's Dictionary (1911): public domain (`/usr/share/doc/dict-devil/copyright`).
"""


def corpus_table_rows(sources: dict) -> list[str]:
    """One markdown table row per source: packages, licence, documents and bytes per split."""
    rows = []
    for name, s in sources.items():
        pk = ", ".join(f"`{p}` {v}" for p, v in s["packages"].items())
        b = s["bytes"]
        d = s["documents"]
        rows.append(
            f"| {name} | {pk} | {s['licence']} | {d['train']} / {d['val']} / {d['heldout']} | "
            f"{b['train']:,} / {b['val']:,} / {b['heldout']:,} |"
        )
    return rows


def write_corpus_md(path: Path, st: dict) -> None:
    rows = corpus_table_rows(st["sources"])
    md = f"""# Training corpus of the tiny OLMoE

Built by `scripts/prepare_corpus.py` from Debian (bookworm) packages only; nothing is downloaded from
the web. Install the sources with

    apt-get update
    apt-get install -y wordnet-base bible-kjv bible-kjv-text python3.11-doc dict-devil

and run `python3 scripts/prepare_corpus.py`. The full corpus goes to `data/corpus/` (git-ignored); the
held-out slice `data/heldout.txt` is committed. Documents are separated by a line holding only
`<|endoftext|>`.

Split: by document, separately per source, with `random.Random({st["seed"]} + source index)`; the
shuffled documents fill the held-out set to {st["heldout_frac"]:.1%} of the source's bytes, then the
validation set to {st["val_frac"]:.1%}; the rest is training. Held-out documents are never seen in
training (tokenizer included); validation documents only choose the saved checkpoint.

| source | Debian packages (version) | licence | documents train / val / held-out | bytes train / val / held-out |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Totals: train {st["train"]["bytes"]:,} bytes in {st["train"]["documents"]} documents
(sha256 `{st["train"]["sha256"][:16]}...`), val {st["val"]["bytes"]:,} bytes in {st["val"]["documents"]},
held-out {st["heldout"]["bytes"]:,} bytes in {st["heldout"]["documents"]}
(sha256 `{st["heldout"]["sha256"][:16]}...`).

"""
    path.write_text(md + CORPUS_MD_RENDERING_AND_LICENCES)


if __name__ == "__main__":
    main()
