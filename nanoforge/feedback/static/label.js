// The labelling page of `nanoforge label`: fetch an item (/api/next), show the prompt and the two responses,
// send the choice (/api/judgements), repeat. Every text the model or the prompt file wrote is set with
// textContent, never as HTML, so a response that contains `<script>` is shown as text.
"use strict";

let current = null; // the item on screen
let sending = false;
let done = 0;

function showPrompt(messages) {
  const box = $("prompt");
  box.replaceChildren();
  for (const m of messages) {
    const div = document.createElement("div");
    div.className = "msg";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    const text = document.createElement("pre");
    text.textContent = m.content;
    div.append(role, text);
    box.append(div);
  }
}

async function loadNext() {
  const item = await api("next");
  current = item.done ? null : item;
  $("item").hidden = item.done;
  $("done").hidden = !item.done;
  if (item.done) return;
  showPrompt(item.prompt);
  $("reference-box").hidden = item.reference === null || item.reference === undefined;
  $("reference").textContent = item.reference || "";
  $("response-a").textContent = item.A;
  $("response-b").textContent = item.B;
  $("reason").value = "";
  $("item").dataset.itemId = String(item.item_id);
}

async function choose(choice) {
  if (!current || sending) return;
  sending = true;
  try {
    await api("judgements", { item_id: current.item_id, choice, reason: $("reason").value });
    done += 1;
    $("progress").textContent = `${done} judged in this session`;
    setStatus("");
  } catch (e) {
    if (!String(e.message).includes("already judged")) throw e;
  } finally {
    sending = false;
  }
  await loadNext();
}

const KEYS = { a: "A", 1: "A", b: "B", 2: "B", t: "tie", 3: "tie", s: "skip", 0: "skip" };

async function start() {
  const me = await api("me");
  $("who").textContent = me.name + (me.simulated ? " (simulated)" : "");
  $("logout").hidden = false;
  await loadNext();
}

document.addEventListener("DOMContentLoaded", () => {
  const fail = (e) => setStatus("error: " + e.message);
  for (const button of document.querySelectorAll("#choices button")) {
    button.addEventListener("click", () => choose(button.dataset.choice).catch(fail));
  }
  document.addEventListener("keydown", (event) => {
    if (event.target === $("reason")) {
      if (event.key === "Escape") $("reason").blur();
      return;
    }
    if (event.target instanceof HTMLInputElement || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "r" && current) {
      event.preventDefault();
      $("reason").focus();
    } else if (KEYS[event.key] && current) {
      event.preventDefault();
      choose(KEYS[event.key]).catch(fail);
    }
  });
  $("logout").addEventListener("click", () => {
    setToken("");
    location.reload();
  });
  withLogin(start);
});
