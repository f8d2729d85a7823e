// The stats page of `nanoforge label`: /api/stats every 5 seconds, written into tables with textContent.
"use strict";

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  row.append(td);
}

function fixed(x, digits) {
  return x === null || x === undefined ? null : Number(x).toFixed(digits);
}

function render(s) {
  $("stats").hidden = false;
  $("summary").textContent = `${s.items_judged} of ${s.items} items judged (${(100 * s.progress).toFixed(1)}%), ` +
    `${s.judgements} judgements (${s.simulated_judgements} simulated)`;
  $("bar").value = s.progress;
  const body = $("annotators").querySelector("tbody");
  body.replaceChildren();
  for (const a of s.annotators) {
    const row = document.createElement("tr");
    for (const v of [a.name, a.simulated ? "simulated" : "human", a.judgements, a.A, a.B, a.tie, a.skip,
      fixed(a.mean_seconds, 1)]) cell(row, v);
    body.append(row);
  }
  const g = s.agreement;
  $("agreement").textContent = g.pairs
    ? `${g.items} items judged by two or more annotators, ${g.pairs} pairs of judgements: ` +
      `${fixed(g.percent_agreement, 1)}% agreement, Cohen's κ ${fixed(g.kappa, 3) ?? "undefined"}`
    : "No item has been judged by two annotators yet.";
  const pairs = $("pairs").querySelector("tbody");
  pairs.replaceChildren();
  for (const p of g.by_pair) {
    const row = document.createElement("tr");
    for (const v of [p.annotators.join(" & "), p.pairs, fixed(p.percent_agreement, 1) + "%", fixed(p.kappa, 3)]) {
      cell(row, v);
    }
    pairs.append(row);
  }
}

async function refresh() {
  render(await api("stats"));
  setStatus("");
}

document.addEventListener("DOMContentLoaded", () => {
  withLogin(async () => {
    await refresh();
    setInterval(() => refresh().catch((e) => setStatus(e.message)), 5000);
  });
});
