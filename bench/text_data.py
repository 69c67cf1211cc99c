"""Real English text for calibration and evaluation: sentences from the docstrings of Python's
standard library (every machine has them), tokenized with all-MiniLM-L6-v2's WordPiece tokenizer.

The sentences are collected in a fixed order and shuffled with a fixed seed; `split` gives the
calibration and evaluation sets, which never share a sentence, and `extra` more calibration
sentences for the same evaluation set. The text depends on the Python version (its docstrings)
and, for `extra`'s last source, numpy's, which the bench tables record; and on the packages
installed beside them, since the modules of site-packages are imported (then skipped) and a few
change what a standard module shows: 3458 sentences with the project and bench/requirements.txt
installed as the README says (where the bench tables ran), 3457 in an environment with torch,
3460 with no site-packages module imported; the shuffle, and so every split, then differs.

    python bench/text_data.py --out DIR --calibration 256 --evaluation 128
writes DIR/calibration/*.npz and DIR/evaluation/*.npz, one tokenized sentence per file (its own
length, no padding): the folder form of `--calibration-data`.
"""
import argparse
import ast
import functools
import importlib
import inspect
import pkgutil
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# pure-Python standard modules with prose docstrings (no GUI, no test suites, nothing that runs on import)
SKIP = ("test", "idlelib", "tkinter", "turtle", "this", "antigravity", "__", "lib2to3", "ensurepip", "pydoc_data")


def stdlib_sentences() -> list[str]:
    """Unique prose sentences of 6 to 40 words from the standard library's docstrings, in a fixed
    order (collected once per process: a second collection in one process found one sentence
    more, the modules imported by the first changing what the second sees)."""
    return list(_stdlib_sentences())


@functools.cache
def _stdlib_sentences() -> tuple[str, ...]:
    seen, out = set(), []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.prefix)
                   or m.module_finder.path.startswith(sys.base_prefix))
    names = [n for n in names if not n.startswith(SKIP) and "site-packages" not in n]
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform modules that do not import here
            continue
        if "site-packages" in (getattr(module, "__file__", "") or ""):
            continue
        docs = [inspect.getdoc(module)]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj))
        for doc in docs:
            _prose(doc or "", seen, out)
    return tuple(out)


def _prose(doc: str, seen: set[str], out: list[str]) -> None:
    """Append the new prose sentences of a text to out (paragraphs with code in them left out)."""
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        if not text or ">>>" in text or "::" in text:
            continue
        for s in SENTENCE.split(text):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s)
            if 6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?" and letters > 0.85 * len(s) \
                    and s not in seen:
                seen.add(s)
                out.append(s)


def source_sentences(root: Path, seen: set[str], out: list[str]) -> None:
    """Append the new prose sentences of every docstring in the Python files under root, read with
    `ast` (nothing is imported, so nothing runs), in path order. Test suites, GUI code and the
    site-packages folder are left out, and so are numpydoc's sections (a title underlined with
    dashes, then parameters and types)."""
    for path in sorted(root.rglob("*.py")):
        parts = [p for p in path.relative_to(root).parts if p != "__init__.py"]
        if any(p.startswith(SKIP) or p in ("tests", "site-packages", "turtledemo") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a file of another Python version or encoding
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                _prose("\n\n".join(p for p in doc.split("\n\n") if not _section(p)), seen, out)


def _section(para: str) -> bool:
    """A numpydoc section ("Returns\n-------\n..."): its parameters and types are not prose."""
    return any(len(line) > 2 and set(line) <= set("-=") for line in map(str.strip, para.splitlines()))


def split(n_calibration: int, n_evaluation: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences."""
    sentences = _shuffled(seed)
    if n_calibration + n_evaluation > len(sentences):
        raise SystemExit(f"only {len(sentences)} sentences here; asked for {n_calibration} + {n_evaluation}")
    return sentences[:n_calibration], sentences[n_calibration:n_calibration + n_evaluation]


def _shuffled(seed: int) -> list[str]:
    sentences = stdlib_sentences()
    random.Random(seed).shuffle(sentences)
    return sentences


def extra(n_calibration: int, n_evaluation: int, count: int) -> list[str]:
    """`count` more calibration sentences for split(n_calibration, n_evaluation), none in its
    evaluation set, from four sources in turn, each read only as far as `count` needs:
    1. the standard library's sentences past both sets;
    2. those of the Python reference's topics (pydoc_data, the text `help()` shows);
    3. the rest of the standard library's docstrings (methods, nested functions and modules that
       do not import here), read from its source files;
    4. numpy's docstrings, read from its source files."""
    from pydoc_data import topics

    sentences = _shuffled(0)
    seen, more = set(sentences), sentences[n_calibration + n_evaluation:]
    for name in sorted(topics.topics):
        _prose(topics.topics[name], seen, more)
    for root in (Path(sysconfig.get_paths()["stdlib"]), Path(np.__file__).parent):
        if count <= len(more):
            break
        source_sentences(root, seen, more)
    if count > len(more):
        raise SystemExit(f"only {len(more)} more sentences here; asked for {count}")
    return more[:count]


def tokenizer_path() -> Path:
    here = Path(__file__).resolve().parent
    for p in (here / ".cache" / "minilm" / "tokenizer.json", here.parents[1] / "shared" / "models" / "tokenizer.json"):
        if p.exists():
            return p
    raise SystemExit("tokenizer.json not found (bench/.cache/minilm or ../shared/models)")


def encode(sentences: list[str], max_len: int = 128) -> list[dict[str, np.ndarray]]:
    """One feed dict per sentence (batch 1, its own length), as MiniLM's inputs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.enable_truncation(max_len)
    tok.no_padding()
    feeds = []
    for enc in tok.encode_batch(sentences):
        ids = np.array([enc.ids], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.array([enc.attention_mask], np.int64),
                      "token_type_ids": np.array([enc.type_ids], np.int64)})
    return feeds


def write_folder(feeds: list[dict[str, np.ndarray]], folder: Path) -> None:
    """One .npz per sample (00000.npz, ...), as --calibration-data reads a folder; the folder's
    earlier .npz files are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):  # a smaller count than last time must not leave samples behind
        old.unlink()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--evaluation", type=int, default=128)
    args = ap.parse_args()
    cal, ev = split(args.calibration, args.evaluation)
    write_folder(encode(cal), args.out / "calibration")
    write_folder(encode(ev), args.out / "evaluation")
    print(f"{len(cal)} calibration and {len(ev)} evaluation sentences in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
