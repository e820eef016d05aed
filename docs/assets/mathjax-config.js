// MathJax 2 (served from the site itself, so pages need no network) for the \( \) and \[ \] that
// pymdownx.arithmatex writes.
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true },
  "HTML-CSS": { availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", imageFont: null },
  showMathMenu: false, messageStyle: "none"
};
