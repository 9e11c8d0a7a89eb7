// Review gallery: one tab stop for all cells (roving tabindex; analysis.js moves focus with the arrow keys),
// the cell size (96 / 160 / 256 px, remembered), and the detail panel of the focused cell: full resolution with
// zoom, path, second choice, flags, familiarity, its field, the explanation one key away (?), reference cells.
(function () {
  "use strict";
  if (window.hemowebGallery) return;  // hx-boost may load the page again: listen once
  window.hemowebGallery = true;
  var SIZES = ["96", "160", "256"], ZOOMS = [1, 2, 3, 4], SIZE_KEY = "hemoweb.cellSize";
  var zoom = 0, shown = null, references = {};  // shown: the cell element the panel shows

  function gallery() { return document.getElementById("cells"); }
  function panel() { return document.getElementById("detail-panel"); }
  function cells() { var g = gallery(); return g ? Array.prototype.slice.call(g.querySelectorAll("[data-cell]")) : []; }
  function cellOf(element) { return element && element.closest ? element.closest("#cells [data-cell]") : null; }

  function rove(cell) {  // the one cell Tab reaches
    var g = gallery();
    if (!g) return;
    g.querySelectorAll("[data-cell][tabindex='0']").forEach(function (other) {
      if (other !== cell) other.setAttribute("tabindex", "-1");
    });
    if (cell.getAttribute("tabindex") !== "0") cell.setAttribute("tabindex", "0");
  }

  function rover() {
    var all = cells(), found = null;
    all.forEach(function (cell) { if (!found && cell.getAttribute("tabindex") === "0") found = cell; });
    return found || all[0] || null;
  }

  function settle() {  // after a load or a swap: exactly one cell is a tab stop, the panel follows a swapped cell
    var all = cells();
    if (!all.length) return;
    var active = cellOf(document.activeElement);
    var zero = all.filter(function (cell) { return cell.getAttribute("tabindex") === "0"; });
    if (active) rove(active);
    var swapped = shown && !shown.isConnected ? document.getElementById(shown.id) : null;
    if (!active && zero.length !== 1) rove(swapped || zero[0] || all[0]);
    if (swapped) show(swapped);  // changed by its list, not by a key: the panel shows the new state
    applySize(storedSize());
  }

  function storedSize() {
    try { return window.localStorage.getItem(SIZE_KEY) || "96"; } catch (e) { return "96"; }
  }

  function applySize(size) {
    if (SIZES.indexOf(size) < 0) size = "96";
    var g = gallery();
    if (g) g.style.setProperty("--thumb-size", size + "px");
    document.querySelectorAll("input[name=cell-size]").forEach(function (input) {
      input.checked = input.value === size;
    });
  }

  function applyZoom(box) {
    var image = box && box.querySelector("img[data-full]");
    if (!image) return;
    var width = parseInt(image.getAttribute("width"), 10) || image.naturalWidth;
    if (width) { image.style.width = (width * ZOOMS[zoom]) + "px"; image.style.height = "auto"; }
    var level = box.parentNode.querySelector("[data-zoom-level]");
    if (level) level.textContent = ZOOMS[zoom] + "×";
  }

  function setZoom(step) {
    zoom = Math.min(Math.max(zoom + step, 0), ZOOMS.length - 1);
    var p = panel();
    applyZoom(p && p.querySelector("[data-zoom-box]"));
  }

  function fillReferences(p, cellId) {
    var slot = p.querySelector("[data-reference-url]");
    if (!slot) return;
    var url = slot.getAttribute("data-reference-url");
    if (typeof references[url] === "string") { slot.innerHTML = references[url]; return; }
    if (!references[url]) {
      references[url] = fetch(url, { credentials: "same-origin", headers: { "HX-Request": "true" } })
        .then(function (response) { return response.ok ? response.text() : ""; })
        .then(function (html) { references[url] = html; return html; })
        .catch(function () { delete references[url]; return ""; });
    }
    references[url].then(function (html) {
      var current = panel() && panel().querySelector("[data-reference-url]");
      var same = current && current.getAttribute("data-reference-url") === url;
      if (shown && shown.id === cellId && same) current.innerHTML = html;
    });
  }

  function show(cell) {
    var p = panel(), template = cell.querySelector("template[data-detail]");
    if (!p || !template) return;
    shown = cell;
    p.replaceChildren(template.content.cloneNode(true));
    p.setAttribute("data-showing", cell.id);
    applyZoom(p.querySelector("[data-zoom-box]"));
    var fieldAnchor = cell.querySelector("a.field-link"), fieldLink = p.querySelector("[data-field-link]");
    var fieldUrl = cell.getAttribute("data-field-url") || (fieldAnchor && fieldAnchor.href);  // a slide run's cell
    if (fieldUrl && fieldLink) { fieldLink.href = fieldUrl; fieldLink.hidden = false; }
    fillReferences(p, cell.id);
  }

  document.addEventListener("focusin", function (event) {
    if (event.target === gallery()) {  // reached by the skip link: go on to the gallery's tab stop
      var target = rover();
      if (target) target.focus();
      return;
    }
    var cell = cellOf(event.target);
    if (!cell) return;
    rove(cell);
    if (shown !== cell) show(cell);
  });

  document.addEventListener("keydown", function (event) {
    var cell = event.target.closest ? event.target.closest("#cells [data-cell]") : null;
    if (!cell || event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
    var all, handled = true;
    if (event.key === "+" || event.key === "=") setZoom(1);
    else if (event.key === "-") setZoom(-1);
    else if (event.key === "?") {
      var explain = cell.querySelector("a.explain-link");
      if (explain) window.location.assign(explain.href);
    } else if (event.key === "Home" || event.key === "End") {
      all = cells();
      if (all.length) all[event.key === "Home" ? 0 : all.length - 1].focus();
    } else handled = false;
    if (handled) event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    var skip = event.target.closest ? event.target.closest("[data-skip-cells]") : null;
    if (skip) {
      var target = rover();
      if (target) { event.preventDefault(); target.focus(); }
      return;
    }
    var step = event.target.closest ? event.target.closest("#detail-panel [data-zoom-step]") : null;
    if (step) setZoom(parseInt(step.getAttribute("data-zoom-step"), 10));
  });

  document.addEventListener("change", function (event) {
    if (event.target.name !== "cell-size") return;
    try { window.localStorage.setItem(SIZE_KEY, event.target.value); } catch (e) { /* private mode: not kept */ }
    applySize(event.target.value);
  });

  // A key answers at once: the cell shows the type sent, marked as saving, until the server's cell replaces it
  // (with its own state, or the reason it refused).
  document.addEventListener("htmx:beforeRequest", function (event) {
    var cell = cellOf(event.target);
    var select = event.target.querySelector && event.target.querySelector("select[name=code]");
    if (!cell || !select || !select.value) return;
    cell.classList.add("saving");
    cell.setAttribute("aria-busy", "true");
    cell.setAttribute("data-sending", select.value);
    var code = cell.querySelector("code.final");
    if (code) code.textContent = select.value;
  });

  document.addEventListener("htmx:afterRequest", function (event) {  // no answer swapped in: show it was not saved
    var cell = cellOf(event.target);
    if (!cell || !cell.isConnected || !cell.classList.contains("saving")) return;
    cell.classList.remove("saving");
    cell.removeAttribute("aria-busy");
    cell.removeAttribute("data-sending");
    var code = cell.querySelector("code.final"), caption = cell.querySelector("figcaption");
    if (code) code.textContent = cell.getAttribute("data-code");
    if (caption && !caption.querySelector("[data-not-saved]")) {
      caption.insertAdjacentHTML("beforeend", '<span class="error" role="alert" data-not-saved>' +
                                 "Not saved: the server did not answer. Press the key again.</span>");
    }
  });

  document.addEventListener("htmx:afterSettle", settle);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", settle);
  else settle();
})();
