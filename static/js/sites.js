// Study report: the Print button (no inline scripts: the Content-Security-Policy forbids them).
document.addEventListener("click", function (event) {
  var button = event.target.closest ? event.target.closest("[data-print]") : null;
  if (button) window.print();
});
