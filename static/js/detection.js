// Detection page: show or hide the boxes of one class, and colour the legend swatches.
(function () {
  "use strict";
  function paint(root) {
    root.querySelectorAll(".swatch[data-colour]").forEach(function (swatch) { swatch.style.color = swatch.dataset.colour; });
  }
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!input.matches || !input.matches("input[data-toggle-class]")) return;
    var name = input.dataset.toggleClass;
    document.querySelectorAll(".detection-canvas rect[data-class]").forEach(function (rect) {
      if (rect.dataset.class === name) rect.style.display = input.checked ? "" : "none";
    });
  });
  document.addEventListener("DOMContentLoaded", function () { paint(document); });
  document.addEventListener("htmx:afterSwap", function (event) { paint(event.target); });
})();
