"Write README.md from nbs/index.ipynb: markdown cells as they are, code cells as python blocks (no Quarto here)."
import json, re, sys
from pathlib import Path

def nb2md(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    out = []
    for c in nb["cells"]:
        src = "".join(c["source"]).strip("\n")
        if c["cell_type"] == "markdown":
            src = re.sub(r"^> (.*)$", r"> \1", src, flags=re.M)
            out.append(src)
        elif c["cell_type"] == "code" and not src.startswith("#|"):
            out.append("```python\n" + src + "\n```")
    return "\n\n".join(out) + "\n"

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    md = nb2md(root / "nbs" / "index.ipynb")
    readme = root / "README.md"
    if "--check" in sys.argv:
        if readme.read_text() != md: sys.exit("README.md is out of date with nbs/index.ipynb: run 'make readme' and commit")
    else: readme.write_text(md)
