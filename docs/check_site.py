"""Check the built documentation site as a reader would see it: `make docs-check` runs this after `make docs`.

The site (`docs/site/`) is served on 127.0.0.1 and every page that `docs/build.py` wrote (its manifest lists
them, one per notebook) is opened in headless Chromium; the DOM Chromium renders, scripts run, is then
checked:

- the page has its title and, for a module, a heading with an anchor for every name in the module's `__all__`
  (the `show_doc` entry: signature, parameter comments, docstring);
- every image of the notebook's outputs is on the page and is served as a real PNG (a tutorial has at least one);
- every internal link resolves to a page of the site, and its `#anchor` to an element of that page;
- nothing is loaded from another host (the site works offline), no traceback is on the page, and where the
  page has math, MathJax has typeset it.

A screenshot of one page is written for a person to look at. Standard library only; needs Chromium
(`apt-get install chromium` on Debian). Prints one line per page and a closing 'N passed, N failed'.
"""
import argparse, ast, functools, http.server, json, shutil, subprocess, sys, tempfile, threading, urllib.request
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse, unquote

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "self_supervised_swav"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars"]

class Page(HTMLParser):
    "What the checks need from a page's DOM: ids, title, images, links, external resources, text, math"
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.ids, self.imgs, self.links, self.external, self.h1, self.text = set(), [], [], [], [], []
        self.math = self.typeset = 0
        self._in_article = self._in_h1 = 0
        self._stack = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a: self.ids.add(a["id"])
        cls = a.get("class") or ""
        if tag == "article": self._in_article += 1
        if tag == "h1" and self._in_article: self._in_h1 += 1; self.h1.append("")
        if "arithmatex" in cls.split(): self.math += 1
        if "MathJax" in cls or tag == "mjx-container": self.typeset += 1
        if tag == "img" and self._in_article: self.imgs.append(a.get("src", ""))
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        for k in ("src", "href"):
            v = a.get(k) or ""
            if tag in ("script", "img", "link", "iframe") and urlparse(v).scheme in ("http", "https") \
               and urlparse(v).hostname not in ("127.0.0.1", "localhost"): self.external.append(f"<{tag} {k}={v}>")
        if tag not in ("img", "br", "hr", "meta", "link", "input", "source", "path", "use"): self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag: pass
        if tag == "article": self._in_article -= 1
        if tag == "h1" and self._in_h1: self._in_h1 -= 1

    def handle_data(self, data):
        if self._in_h1 and self.h1: self.h1[-1] += data
        if self._in_article: self.text.append(data)

def module_api(module: str) -> tuple[list[str], set[str]]:
    "Names in `__all__` of a library module, and those of them that are functions or classes"
    tree = ast.parse((LIB / f"{module.replace('.', '/')}.py").read_text())
    names, defs = [], set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = [ast.literal_eval(e) for e in node.value.elts]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): defs.add(node.name)
    return names, defs & set(names)

def find_chromium() -> str:
    for nm in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(nm): return shutil.which(nm)
    sys.exit("docs-check: Chromium not found (Debian: apt-get install chromium)")

def chromium(exe: str, *args: str, timeout: int = 90) -> str:
    "Run headless Chromium with a fresh profile; return its stdout"
    with tempfile.TemporaryDirectory(prefix="docs-check-chromium-") as profile:
        r = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                           capture_output=True, text=True, timeout=timeout)
    if r.returncode: raise RuntimeError(f"chromium {' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout

def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(site))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"

@functools.lru_cache(maxsize=None)
def static_ids(path: Path) -> frozenset:
    "Ids of a page as served (anchors of headings are written by mkdocs, not by scripts)"
    return frozenset(Page(path.read_text(errors="replace")).ids)

def check_page(rel: str, info: dict, site: Path, base: str, exe: str) -> list[str]:
    url = urljoin(base, rel)
    dom = chromium(exe, "--virtual-time-budget=10000", "--dump-dom", url)
    p, errs = Page(dom), []
    if not dom.strip(): return [f"empty DOM for {url}"]
    if info["title"] not in "".join(p.h1): errs.append(f"h1 {p.h1!r} does not contain the title {info['title']!r}")
    text = " ".join(p.text)
    expected = set(info["api"])
    if info.get("module"):
        names, defs = module_api(info["module"])
        expected |= defs
        errs += [f"`{n}` (in __all__) not on the page" for n in names if n not in defs and n not in text]
    errs += [f"no API entry (heading id) for `{n}`" for n in sorted(expected - p.ids)]
    if rel.startswith("tutorials/") and not info["images"]: errs.append("a tutorial without a plot")
    if len(p.imgs) != info["images"]: errs.append(f"{len(p.imgs)} images on the page, the notebook has {info['images']}")
    for src in p.imgs:
        try:
            with urllib.request.urlopen(urljoin(url, src), timeout=30) as r: data = r.read()
            if not data.startswith(b"\x89PNG") or len(data) < 1000: errs.append(f"image {src} is not a PNG plot")
        except Exception as e: errs.append(f"image {src}: {e}")
    for href in p.links:
        target, frag = urldefrag(urljoin(url, href))
        if not target.startswith(base): continue  # another site
        path = site / unquote(urlparse(target).path).lstrip("/")
        if path.is_dir(): path = path / "index.html"
        if not path.is_file(): errs.append(f"broken link {href}"); continue
        if frag and path.suffix == ".html" and unquote(frag) not in static_ids(path):
            errs.append(f"link {href}: no #{unquote(frag)} on {path.relative_to(site)}")
    errs += [f"loads from another host: {e}" for e in p.external]
    if "Traceback (most recent call last)" in text: errs.append("a traceback is on the page")
    if p.math and not p.typeset: errs.append(f"{p.math} math elements were not typeset by MathJax")
    return list(dict.fromkeys(errs))   # each problem once

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, default=ROOT / "docs" / "site")
    ap.add_argument("--manifest", type=Path, default=ROOT / "docs" / "_build" / "manifest.json")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "_build" / "screenshot.png")
    ap.add_argument("--screenshot_page", default="02_swav.html")
    ap.add_argument("--n_workers", type=int, default=2)
    args = ap.parse_args()
    manifest = json.loads(args.manifest.read_text())
    exe = find_chromium()
    srv, base = serve(args.site)
    failed = []
    try:
        missing = [rel for rel in manifest if not (args.site / rel).is_file()]
        for rel in missing: print(f"FAIL {rel}: page not built"); failed.append(rel)
        pages = [rel for rel in manifest if rel not in missing]
        with ThreadPoolExecutor(args.n_workers) as ex:
            for rel, errs in zip(pages, ex.map(lambda r: check_page(r, manifest[r], args.site, base, exe), pages)):
                info = manifest[rel]
                if errs: failed.append(rel); print(f"FAIL {rel}:\n  " + "\n  ".join(errs))
                else: print(f"ok   {rel}: {len(info['api'])} API entries, {info['images']} images")
        shot = args.screenshot_page if args.screenshot_page in manifest else next(iter(manifest))
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        chromium(exe, "--virtual-time-budget=10000", "--window-size=1280,1600", f"--screenshot={args.screenshot}",
                 urljoin(base, shot))
        if not args.screenshot.is_file() or args.screenshot.stat().st_size < 20_000:
            print(f"FAIL screenshot of {shot}: {args.screenshot} missing or blank"); failed.append("screenshot")
        else: print(f"ok   screenshot of {shot}: {args.screenshot}")
    finally: srv.shutdown()
    n = len(manifest) + 1
    print(f"docs-check: {n - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)

if __name__ == "__main__": main()
