// The rollout page: expand a collapsed step (fetches its whole content) and lay a dataset version's
// windows over the conversation (fetches /api/overlay?rollout=ID&ref=NAME@N). No framework, no build.
"use strict";
const conv = document.getElementById("conversation");
const rid = conv.dataset.rollout;
const q = `rollout=${encodeURIComponent(rid)}`;  // ids go into URLs encoded: "/" and ".." stay part of the id

// The page holds the first steps; the rest are fetched as HTML and appended (a long rollout shows at once).
const ready = (async () => {
  const more = document.getElementById("more");
  if (more) {
    const res = await fetch(`/api/steps?${q}&start=${more.dataset.start}`);
    if (!res.ok) { more.textContent = `the later steps could not be loaded (HTTP ${res.status})`; return; }
    more.insertAdjacentHTML("beforebegin", await res.text());
    more.remove();
    const target = location.hash && document.getElementById(location.hash.slice(1));
    if (target) target.scrollIntoView();
  }
  await showFind();
  conv.dataset.complete = "1";
})();

async function expand(btn) {
  btn.disabled = true;
  btn.textContent = "loading…";
  const res = await fetch(`/api/step?${q}&idx=${btn.dataset.step}`);
  const body = await res.json();
  const step = btn.closest(".step");
  if (!res.ok) { btn.textContent = body.error; return; }
  step.querySelectorAll("pre.body").forEach((p) => p.remove());
  const pre = document.createElement("pre");
  pre.className = "body full";
  pre.textContent = body.content;
  btn.replaceWith(pre);
}

// Arriving from a search hit (?find=TEXT#s-N): the step is expanded if collapsed (the match may sit in the
// middle the page leaves out) and every match in it is marked.
async function showFind() {
  const find = new URLSearchParams(location.search).get("find");
  const target = location.hash && document.getElementById(location.hash.slice(1));
  if (!find || !target) return;
  const btn = target.querySelector("button.expand");
  if (btn) await expand(btn);
  const needle = find.toLowerCase();
  target.querySelectorAll("pre.body, .call code").forEach((el) => {
    const text = el.textContent, lower = text.toLowerCase();
    if (!lower.includes(needle)) return;
    el.textContent = "";
    let at = 0;
    for (let i = lower.indexOf(needle); i >= 0; i = lower.indexOf(needle, at)) {
      el.append(text.slice(at, i));
      const mark = document.createElement("mark");
      mark.textContent = text.slice(i, i + needle.length);
      el.append(mark);
      at = i + needle.length;
    }
    el.append(text.slice(at));
  });
  target.classList.add("current");
  const first = target.querySelector("mark");
  (first || target).scrollIntoView({block: "center"});
}

conv.addEventListener("click", (ev) => {
  const btn = ev.target.closest("button.expand");
  if (btn) expand(btn);
});

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function clearOverlay() {
  document.querySelectorAll("a.toklink").forEach((a) => { a.href = a.href.replace(/&ref=.*$/, ""); });
  document.querySelectorAll(".ov").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll(".step.in-window, .step.dropped, .step.truncated").forEach((el) =>
    el.classList.remove("in-window", "dropped", "truncated"));
  document.querySelector("#windows tbody").textContent = "";
  document.getElementById("overlay-info").textContent = "";
}

function highlight(steps) {
  document.querySelectorAll(".step.in-window").forEach((el) => el.classList.remove("in-window"));
  steps.forEach((s) => { const el = document.getElementById(`s-${s}`); if (el) el.classList.add("in-window"); });
  const first = document.getElementById(`s-${steps[0]}`);
  if (first) first.scrollIntoView({block: "center"});
}

async function showOverlay(ref) {
  await ready;  // chips go on every step
  clearOverlay();
  if (!ref) return;
  const info = document.getElementById("overlay-info");
  info.textContent = "loading…";
  const res = await fetch(`/api/overlay?${q}&ref=${encodeURIComponent(ref)}`);
  const ov = await res.json();
  if (!res.ok) { info.textContent = ov.error; return; }
  const drops = Object.entries(ov.drops).map(([k, v]) => `${k} ${v.count} ${v.unit}`).join(", ");
  info.textContent = ov.included
    ? `${ov.ref}: ${ov.windows.length} windows, max_tokens ${ov.config.max_tokens}, overlap ${ov.config.overlap_turns} turns`
    : `${ov.ref} left this rollout out (the version's drops: ${drops || "none"})`;
  info.dataset.ref = ov.ref;
  const tbody = document.querySelector("#windows tbody");
  for (const w of ov.windows) {
    const tr = document.createElement("tr");
    tr.className = "window";
    tr.dataset.window = w.window_idx;
    [w.window_idx, `${w.first_turn}–${w.last_turn}`, `${w.first_step}–${w.last_step}`, w.n_tokens, w.n_loss_tokens,
     fmt(w.q, 3), fmt(w.advantage, 3), w.obs_truncated ? "yes" : ""].forEach((v) => {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    });
    tr.addEventListener("click", () => highlight(w.steps));
    tbody.appendChild(tr);
  }
  for (const [idx, s] of Object.entries(ov.steps)) {
    const el = document.getElementById(`ov-${idx}`);
    if (!el) continue;
    const tok = el.closest(".step").querySelector("a.toklink");  // the token view opens with this window's mask
    if (tok && s.windows.length) tok.href = `/tokens?${q}&step=${idx}&ref=${encodeURIComponent(ov.ref)}&window=${s.windows[0]}`;
    for (const w of s.windows) {
      const chip = document.createElement("span");
      chip.className = `chip w${w % 6}`; chip.textContent = `w${w}`; el.appendChild(chip);
    }
    if (s.truncated) {
      const chip = document.createElement("span");
      chip.className = "chip trunc"; chip.textContent = `truncated: ${s.truncated}`; el.appendChild(chip);
      el.closest(".step").classList.add("truncated");
    }
    if (s.dropped) {
      const chip = document.createElement("span");
      chip.className = "chip dropped"; chip.textContent = `dropped: ${s.dropped}`; chip.title = s.why; el.appendChild(chip);
      el.closest(".step").classList.add("dropped");
    }
  }
}

const select = document.getElementById("overlay-select");
select.addEventListener("change", () => showOverlay(select.value));
