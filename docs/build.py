"""Build the documentation sources from the notebooks: `make docs` runs this, then `mkdocs build`.

Every notebook in `nbs/*.ipynb` and `nbs/tutorials/*.ipynb` becomes one Markdown page in `docs/_build/src/`:
nbdev's `add_show_docs` adds a `show_doc` cell after each exported definition (signature with its "docments"
parameter comments and docstring), then the whole notebook is executed with execnb (as `nbdev_test` does:
cells marked `#| eval: false` are not run), and cells and outputs are written as Markdown, with plots as PNG files
beside the page. Executed notebooks are cached in `docs/_build/cache/` by the hash of the notebook and of the
library, so a rebuild after editing one notebook re-runs only that one. Also written: `docs/_build/mkdocs.yml`
(`docs/mkdocs.yml` plus the navigation) and `docs/_build/manifest.json` (what `docs/check_site.py` expects on
each page).

Run with the dev environment's Python: `.venv/bin/python docs/build.py [--n_workers 2] [--force]`.
"""
import argparse, base64, hashlib, json, os, re, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, DOCS = ROOT / "nbs", ROOT / "docs"
BUILD = DOCS / "_build"
SRC, CACHE = BUILD / "src", BUILD / "cache"
LIB = ROOT / "self_supervised_swav"
BUILD_VERSION = "1"  # bump to invalidate the cache when the way notebooks are executed changes

def find_notebooks() -> list[Path]:
    "The notebooks that make the site: the glob, so notebooks added later are included"
    keep = lambda p: not p.name.startswith(("_", "."))
    return sorted(filter(keep, NBS.glob("*.ipynb"))) + sorted(filter(keep, NBS.glob("tutorials/*.ipynb")))

def page_path(nb: Path) -> Path:
    "Where the page of notebook `nb` goes, relative to the docs sources (`nbs/tutorials/x.ipynb` -> `tutorials/x.md`)"
    return nb.relative_to(NBS).with_suffix(".md")

def source_hash(nb: Path) -> str:
    h = hashlib.sha1(BUILD_VERSION.encode())
    for p in [nb, *sorted(LIB.glob("*.py"))]: h.update(p.read_bytes())
    return h.hexdigest()[:16]

# ---------------------------------------------------------------- executing (one process per notebook)

def _no_eval(cell) -> bool:
    "Cells not run, as in `nbdev_test`: markdown, `#| eval: false` and the `tst_flags` of settings.ini"
    if cell.cell_type != "code": return True
    d = getattr(cell, "directives_", {}) or {}
    return d.get("eval:", [""])[0].lower() == "false" or bool({"notest", "slow"} & d.keys())

def execute(nb_path: str, out_path: str, n_threads: int) -> tuple[str, float]:
    "Add `show_doc` cells after the exported definitions of `nb_path`, run every cell, write the result to `out_path`"
    import torch
    torch.set_num_threads(n_threads)
    from execnb.nbio import write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs, populate_language
    nb_path, t0 = Path(nb_path), time.time()
    nb = NBProcessor(nb_path, procs=[populate_language, add_show_docs], process=True).nb
    shell = CaptureShell(nb_path)
    shell.run_cell("from nbdev.showdoc import show_doc")
    with working_directory(nb_path.parent):
        try: shell.run_all(nb, exc_stop=True, preproc=_no_eval)
        except Exception: sys.exit(shell.prettytb(fname=nb_path))
    for c in nb.cells:  # keep what the renderer needs: source, outputs, directives, whether it is a show_doc cell
        c.metadata = {"directives": {k: v for k, v in (c.get("directives_") or {}).items()},
                      "show_doc": bool(getattr(c, "has_sd", False))}
        for k in [k for k in c if k.endswith("_")]: del c[k]
    write_nb(nb, out_path)
    return str(nb_path), time.time() - t0

# ---------------------------------------------------------------- rendering Markdown (main process)

_re_source_link = re.compile(r"^\[source\]\(.*\)\{.*\}\s*$", re.M)
_re_sd_heading = re.compile(r"^(#{2,4}) ([A-Za-z_][\w.]*)\s*$", re.M)
_re_ipynb_link = re.compile(r"\]\(((?!https?:)[^)#\s]+)\.ipynb(#[^)\s]*)?\)")
_re_ticked = re.compile(r"(?<![\[\w])`([A-Za-z_][\w.]*)(?:\(\))?`(?!\]\()")
_re_fence = re.compile(r"^(```|~~~)")

def _text(x) -> str: return "".join(x) if isinstance(x, list) else (x or "")

def _strip_ansi(s: str) -> str: return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s)

# fastprogress's console bars (the shell running the notebooks is not a notebook front end): keep the table only
_re_bar = re.compile(r"█|(?:Epoch \d+/\d+ :\s*)?\|[█-]*\|\s*[\d.]+% \[[^\]]*\]|Epoch \d+/\d+ :\s+")
def _strip_bars(s: str) -> str: return "\n".join(_re_bar.sub("", l).rstrip() for l in s.replace("\r", "").split("\n"))

def _code_block(src: str, lang: str = "python") -> str:
    fence = "````" if "```" in src else "```"
    return f"{fence}{lang}\n{src.rstrip()}\n{fence}"

def _outside_fences(md: str, f) -> str:
    "Apply `f` to the lines of `md` that are not inside fenced code blocks"
    out, fenced = [], False
    for line in md.split("\n"):
        if _re_fence.match(line.lstrip()): fenced = not fenced; out.append(line)
        else: out.append(line if fenced else f(line))
    return "\n".join(out)

class Renderer:
    "Turns executed notebooks into Markdown pages, with links from backticked API names to their documentation"
    def __init__(self): self.anchors = {}  # API name -> page (relative to SRC)

    def collect_anchors(self, page: Path, nb: dict):
        for c in nb["cells"]:
            if not c["metadata"].get("show_doc"): continue
            for o in c.get("outputs", []):
                for _, nm in _re_sd_heading.findall(_text(o.get("data", {}).get("text/markdown"))):
                    self.anchors.setdefault(nm, page)

    def link(self, page: Path, nm: str) -> str | None:
        target = self.anchors.get(nm)
        if target is None: return None
        rel = os.path.relpath(SRC / target, (SRC / page).parent) if target != page else ""
        return f"{rel}#{nm}"

    def linkify(self, page: Path, md: str) -> str:
        def sub_line(line):
            line = _re_ipynb_link.sub(lambda m: f"]({m[1]}.md{m[2] or ''})", line)
            def repl(m):
                url = self.link(page, m[1])
                return f"[{m[0]}]({url})" if url else m[0]
            return _re_ticked.sub(repl, line)
        return _outside_fences(md, sub_line)

    def render(self, page: Path, nb: dict) -> tuple[str, dict]:
        "Markdown of a page, and what the checker must find on it: API names and the number of images"
        out, images, api = [], 0, []
        img_dir = SRC / page.parent / f"{page.stem}_files"
        shutil.rmtree(img_dir, ignore_errors=True)
        for c in nb["cells"]:
            src = _text(c["source"])
            if c["cell_type"] == "markdown":
                out.append(self.linkify(page, src)); continue
            if c["cell_type"] != "code": continue
            d = c["metadata"].get("directives", {})
            if "hide" in d or "exporti" in d or "default_exp" in d: continue
            code = "\n".join(l for l in src.split("\n") if not l.lstrip().startswith("#|")).strip("\n")
            if c["metadata"].get("show_doc"): pass
            elif "export" in d and code:
                out.append(f'<details class="source"><summary>Exported source</summary>\n\n{_code_block(code)}\n\n</details>')
            elif code and d.get("echo:", [""])[0].lower() != "false": out.append(_code_block(code))
            if d.get("output:", [""])[0].lower() == "false": continue
            for o in c.get("outputs", []):
                if o["output_type"] == "stream":
                    txt = _strip_bars(_strip_ansi(_text(o["text"])))
                    if o["name"] == "stderr" and "Warning" in txt: continue  # library warnings are noise on a page
                    if txt.strip(): out.append(_code_block(txt, "text"))
                    continue
                data = o.get("data", {})
                if "image/png" in data:
                    img_dir.mkdir(parents=True, exist_ok=True)
                    images += 1
                    fn = img_dir / f"img{images:02d}.png"
                    fn.write_bytes(base64.b64decode(_text(data["image/png"])))
                    out.append(f"![output {images}]({page.stem}_files/{fn.name})")
                elif "text/markdown" in data:
                    md = _re_source_link.sub("", _text(data["text/markdown"]))
                    if c["metadata"].get("show_doc"):
                        api += [nm for _, nm in _re_sd_heading.findall(md)]
                        md = _re_sd_heading.sub(lambda m: f"{m[1]} {m[2]} {{ #{m[2]} }}", md)
                        md = md.replace("---\n", "", 1)
                        md = f'<div class="api" markdown>\n\n{md.strip()}\n\n</div>'
                    out.append(self.linkify(page, md))
                elif "text/html" in data:
                    out.append(f'<div class="output-html">\n{_text(data["text/html"]).strip()}\n</div>')
                elif "text/plain" in data:
                    out.append(_code_block(_strip_ansi(_text(data["text/plain"])), "text"))
        return "\n\n".join(out) + "\n", {"api": api, "images": images}

def page_title(nb: dict, default: str) -> str:
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            m = re.search(r"^#\s+(.+)$", _text(c["source"]), re.M)
            if m: return m[1].strip()
    return default

def _yaml_str(s: str) -> str: return json.dumps(s)  # a JSON string is a valid YAML scalar

def write_config(pages: list[tuple[Path, str]]):
    "`docs/mkdocs.yml` with the navigation of the pages found, as `docs/_build/mkdocs.yml`"
    groups = {"": [], "API": [], "Tutorials": []}
    for page, title in pages:
        key = "" if page.name == "index.md" and page.parent == Path(".") else "Tutorials" if page.parts[0] == "tutorials" else "API"
        groups[key].append(f"    - {_yaml_str(title)}: {page.as_posix()}")
    nav = ["nav:"] + (["  - Home: index.md"] if groups[""] else [])
    for g in ["API", "Tutorials"]:
        if groups[g]: nav += [f"  - {g}:", *groups[g]]
    base = (DOCS / "mkdocs.yml").read_text()
    (BUILD / "mkdocs.yml").write_text(base.rstrip() + "\n\n# written by docs/build.py\n" + "\n".join(nav) + "\n")

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n_workers", type=int, default=int(os.environ.get("DOCS_WORKERS", 2)))
    ap.add_argument("--force", action="store_true", help="execute every notebook, ignoring the cache")
    ap.add_argument("--mathjax", type=Path, help="a MathJax 2 folder (with MathJax.js) to serve from the site")
    ap.add_argument("--only", nargs="*", help="while writing docs: only the notebooks whose path contains one of these")
    ap.add_argument("--execute", nargs=3, metavar=("NOTEBOOK", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.execute: return execute(args.execute[0], args.execute[1], int(args.execute[2]))
    t0 = time.time()
    nbs = find_notebooks()
    if args.only: nbs = [nb for nb in nbs if any(o in str(nb) for o in args.only)]
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = {nb: CACHE / f"{page_path(nb).as_posix().replace('/', '__')[:-3]}.{source_hash(nb)}.ipynb" for nb in nbs}
    todo = [nb for nb in nbs if args.force or not cached[nb].exists()]
    print(f"docs: {len(nbs)} notebooks, {len(todo)} to execute ({len(nbs) - len(todo)} cached)", flush=True)
    if todo:
        n_threads = max(1, (os.cpu_count() or 1) // max(1, min(args.n_workers, len(todo))))
        def run(nb):  # a fresh interpreter per notebook, as a user running it top to bottom
            t = time.time()
            r = subprocess.run([sys.executable, __file__, "--execute", str(nb), str(cached[nb]), str(n_threads)],
                               capture_output=True, text=True)
            return nb, time.time() - t, r
        errors = []
        with ThreadPoolExecutor(args.n_workers) as ex:
            for nb, secs, r in ex.map(run, todo):
                if r.returncode: errors.append(f"{nb.relative_to(ROOT)} failed:\n{r.stderr[-6000:]}")
                else: print(f"  executed {nb.relative_to(ROOT)} in {secs:.0f}s", flush=True)
        if errors: sys.exit("\n\n".join(errors))
    for p in CACHE.glob("*.ipynb"):  # drop stale cache entries
        if p not in cached.values(): p.unlink()
    shutil.rmtree(SRC, ignore_errors=True)
    SRC.mkdir(parents=True)
    shutil.copytree(DOCS / "assets", SRC / "assets")
    if args.mathjax: shutil.copytree(args.mathjax, SRC / "assets" / "mathjax")
    r, loaded = Renderer(), {nb: json.loads(cached[nb].read_text()) for nb in nbs}
    for nb in nbs: r.collect_anchors(page_path(nb), loaded[nb])
    manifest, pages = {}, []
    for nb in nbs:
        page = page_path(nb)
        md, info = r.render(page, loaded[nb])
        (SRC / page).parent.mkdir(parents=True, exist_ok=True)
        (SRC / page).write_text(md)
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", "\n".join(_text(c["source"]) for c in loaded[nb]["cells"]), re.M)
        title = page_title(loaded[nb], nb.stem)
        pages.append((page, title))
        manifest[page.with_suffix(".html").as_posix()] = {**info, "title": title, "notebook": nb.relative_to(ROOT).as_posix(),
                                                          "module": m[1] if m else None}
    write_config(pages)
    (BUILD / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"docs: {len(pages)} pages written to {SRC.relative_to(ROOT)} in {time.time() - t0:.0f}s", flush=True)

if __name__ == "__main__": main()
