// Keyboard navigation (every page): "/" focuses the search box; on the rollouts list j/k move the selected
// row and Enter opens it; on a rollout page j/k go to the next/previous step and n/p to the next/previous
// rollout of the list the user came from (kept in sessionStorage), else of the default list order.
"use strict";
(() => {
  const typing = (el) => el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
  const table = document.getElementById("rollouts");
  const conv = document.getElementById("conversation");
  if (table) {  // remember this list's order for n/p on the rollout pages it links to
    const ids = Array.from(table.querySelectorAll("tbody td.id:first-child a")).map((a) => a.getAttribute("href"));
    sessionStorage.setItem("klong.list", JSON.stringify(ids));
  }
  let row = -1;
  function selectRow(k) {
    const rows = table.querySelectorAll("tbody tr");
    if (!rows.length) return;
    row = Math.max(0, Math.min(rows.length - 1, k));
    rows.forEach((r, i) => r.classList.toggle("selected", i === row));
    rows[row].scrollIntoView({block: "nearest"});
  }
  function currentStep() {  // the step nearest the top of the window, or the one last moved to
    const steps = Array.from(conv.querySelectorAll(".step"));
    const focused = steps.indexOf(document.activeElement);
    if (focused >= 0) return {steps, k: focused};
    const k = steps.findIndex((s) => s.getBoundingClientRect().bottom > 8);
    return {steps, k: k < 0 ? steps.length - 1 : k - 1};
  }
  function goStep(delta) {
    const {steps, k} = currentStep();
    const next = steps[Math.max(0, Math.min(steps.length - 1, k + delta))];
    if (!next) return;
    steps.forEach((s) => s.classList.remove("current"));
    next.classList.add("current");
    next.focus({preventScroll: true});
    next.scrollIntoView({block: "start"});
    history.replaceState(null, "", "#" + next.id);
  }
  function goRollout(delta) {
    const here = location.pathname + location.search.replace(/[?&]find=[^&]*/, "");
    const list = JSON.parse(sessionStorage.getItem("klong.list") || "[]");
    const k = list.indexOf(here);
    if (k >= 0 && list[k + delta]) { location.href = list[k + delta]; return; }
    const link = document.getElementById(delta > 0 ? "next" : "prev");  // the default order (newest first)
    if (link) location.href = link.getAttribute("href");
  }
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || typing(ev.target)) return;
    if (ev.key === "/") {
      const box = document.getElementById("findq") || document.getElementById("navq");
      if (box) { ev.preventDefault(); box.focus(); }
    } else if (table && (ev.key === "j" || ev.key === "k")) {
      selectRow(row + (ev.key === "j" ? 1 : -1));
    } else if (table && ev.key === "Enter" && row >= 0) {
      table.querySelectorAll("tbody tr")[row].querySelector("a").click();
    } else if (conv && (ev.key === "j" || ev.key === "k")) {
      goStep(ev.key === "j" ? 1 : -1);
    } else if (conv && (ev.key === "n" || ev.key === "p")) {
      goRollout(ev.key === "n" ? 1 : -1);
    }
  });
})();
