// Leaderboard tables: click a header to sort (again to reverse), pick values in the selects to filter.
// Plain DOM, no library: the plots are plotly's; this only reorders and hides table rows.
(function () {
  "use strict";
  function init(table) {
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var scope = table.closest("section") || document;
    var selects = Array.prototype.slice.call(scope.querySelectorAll("select[data-filter]"));
    var count = scope.querySelector(".row-count");
    function apply() {
      var shown = 0;
      rows.forEach(function (r) {
        var ok = selects.every(function (s) { return !s.value || r.getAttribute("data-" + s.getAttribute("data-filter")) === s.value; });
        r.hidden = !ok;
        if (ok) { shown += 1; }
      });
      if (count) { count.textContent = shown + " of " + rows.length + " rows"; }
    }
    selects.forEach(function (s) { s.addEventListener("change", apply); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      var kind = th.getAttribute("data-sort");
      if (!kind) { return; }
      th.tabIndex = 0;
      function sort() {
        var col = th.cellIndex;
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        function key(r) {
          var c = r.cells[col];
          var v = c.hasAttribute("data-v") ? c.getAttribute("data-v") : c.textContent.trim();
          return kind === "num" ? (v === "" ? NaN : parseFloat(v)) : v;
        }
        var sorted = Array.prototype.slice.call(tbody.rows).sort(function (a, b) {
          var x = key(a), y = key(b);
          if (kind === "num") {
            if (isNaN(x) && isNaN(y)) { return 0; }
            if (isNaN(x)) { return 1; }  // missing values last in both directions
            if (isNaN(y)) { return -1; }
            return asc ? x - y : y - x;
          }
          return asc ? x.localeCompare(y) : y.localeCompare(x);
        });
        sorted.forEach(function (r) { tbody.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(); } });
    });
    apply();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), init);
})();
