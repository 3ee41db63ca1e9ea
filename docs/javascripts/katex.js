// Typesets the formulas that pymdownx.arithmatex (generic mode) marks with the class
// "arithmatex": "\( ... \)" inline, "\[ ... \]" on its own line. KaTeX itself is copied into the
// site at build time (docs/hooks/katex.py), so no page needs the network to show a formula.
(function () {
  function typeset(root) {
    root.querySelectorAll(".arithmatex").forEach(function (el) {
      if (el.querySelector(".katex")) return; // already typeset
      var tex = el.textContent.trim();
      var display = tex.startsWith("\\[");
      if (display || tex.startsWith("\\(")) tex = tex.slice(2, -2);
      // A formula KaTeX cannot parse is shown in red with its source (class "katex-error");
      // .ci/check_docs_browser.py fails on it.
      katex.render(tex, el, { displayMode: display, throwOnError: false });
    });
  }
  if (typeof document$ !== "undefined") {
    // Material's page-load observable: also fires after instant navigation.
    document$.subscribe(function () { typeset(document.body); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  } else {
    typeset(document.body);
  }
})();
