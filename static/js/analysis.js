// Verification gallery: arrow keys move between cells, one key per cell type reclassifies the focused cell,
// Enter accepts the best guess of a cell that stopped unresolved (else the type it shows), Space the type it shows
// (review state `accepted`).
(function () {
  "use strict";
  if (window.hemowebAnalysis) return;  // hx-boost may load the page again: listen once
  window.hemowebAnalysis = true;
  var refocus = null;

  function cells() { return Array.prototype.slice.call(document.querySelectorAll("[data-cell]")); }

  function rowLength(all, cell) {
    var top = cell.offsetTop, n = 0;
    all.forEach(function (other) { if (other.offsetTop === top && other.parentNode === cell.parentNode) n += 1; });
    return Math.max(n, 1);
  }

  function keyMap() {
    var element = document.getElementById("keymap");
    try { return element ? JSON.parse(element.getAttribute("data-keys")) : {}; } catch (e) { return {}; }
  }

  document.addEventListener("keydown", function (event) {
    var cell = event.target.closest ? event.target.closest("[data-cell]") : null;
    if (!cell || event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
    var all = cells(), index = all.indexOf(cell), step = 0;
    if (event.key === "ArrowRight") step = 1;
    else if (event.key === "ArrowLeft") step = -1;
    else if (event.key === "ArrowDown") step = rowLength(all, cell);
    else if (event.key === "ArrowUp") step = -rowLength(all, cell);
    if (step) {
      var next = all[Math.min(Math.max(index + step, 0), all.length - 1)];
      if (next) next.focus();
      event.preventDefault();
      return;
    }
    var shown = cell.getAttribute("data-code"), code;
    if (event.key === "Enter") code = cell.getAttribute("data-guess") || shown;
    else if (event.key === " ") code = shown;
    else code = keyMap()[event.key.toLowerCase()];
    var select = cell.querySelector("select[name=code]");
    if (!code || !select) return;
    event.preventDefault();
    // the same type again is an acceptance: sent while the cell is pending review
    if (select.value === code && cell.getAttribute("data-review") !== "pending") return;
    select.value = code;
    if (select.value !== code) return;  // not a type of the list (a cell at the root): choose one
    refocus = cell.id;
    select.dispatchEvent(new Event("change", { bubbles: true }));
  });

  document.addEventListener("htmx:afterSettle", function () {
    if (!refocus) return;
    var element = document.getElementById(refocus), active = document.activeElement;
    refocus = null;
    // settling comes after the swap: a reviewer who has moved on to another cell keeps it
    var movedOn = active && active !== element && active.closest && active.closest("[data-cell]");
    if (element && !movedOn) element.focus();
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-print]") : null;
    if (button) window.print();
    var opener = event.target.closest ? event.target.closest("[data-dialog]") : null;
    var dialog = opener && document.getElementById(opener.getAttribute("data-dialog"));
    if (dialog && !dialog.open) dialog.showModal();
    var closer = event.target.closest ? event.target.closest("[data-close-dialog]") : null;
    if (closer && closer.closest("dialog")) closer.closest("dialog").close();
  });
})();
