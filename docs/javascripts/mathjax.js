// MathJax configuration for pymdownx.arithmatex (generic mode). The MathJax library itself is
// not bundled: add it to extra_javascript when building the site with network access.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
