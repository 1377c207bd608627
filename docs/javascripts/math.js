// Typesets the math that pymdownx.arithmatex (generic mode) leaves in the pages:
// <span class="arithmatex">\(...\)</span> inline and <div class="arithmatex">\[...\]</div>
// for display math. KaTeX is vendored under katex/, so math renders without a network.
(function () {
  function typeset(root) {
    root.querySelectorAll(".arithmatex").forEach(function (el) {
      if (el.dataset.typeset) return;
      var display = el.tagName === "DIV";
      var tex = el.textContent.trim().replace(/^\\[\(\[]/, "").replace(/\\[\)\]]$/, "");
      try {
        katex.render(tex, el, { displayMode: display, throwOnError: false });
        el.dataset.typeset = "1";
      } catch (err) {
        console.error("KaTeX could not typeset", tex, err);
      }
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (doc) { typeset(doc.body); });  // Material's page-load stream
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  }
})();
