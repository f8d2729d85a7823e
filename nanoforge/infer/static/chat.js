// The web chat of `nanoforge serve` (nanoforge/infer/server.py). It keeps the conversation in memory,
// sends it whole to /v1/chat/completions with `stream: true`, and reads the Server-Sent Events through
// fetch + ReadableStream. Every text (the model's, the user's, error messages) is set with textContent,
// never as HTML: whatever the model writes, `<script>` included, shows as text.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} of every finished turn
let modelId = null;
let controller = null; // aborts the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text) {
  $("status").textContent = text;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("log").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall back to the status line
  }
  return `${resp.status} ${resp.statusText}`;
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  const card = (await resp.json()).data[0];
  modelId = card.id;
  $("model").textContent = `${card.id} · context ${card.max_model_len} tokens`;
  $("max-tokens").max = String(card.max_model_len);
}

// The parsed JSON of each `data:` event of a Server-Sent Events body, until `data: [DONE]`.
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function request() {
  const system = $("system").value.trim();
  const body = {
    model: modelId,
    messages: system ? [{ role: "system", content: system }, ...conversation] : [...conversation],
    stream: true,
    temperature: Number($("temperature").value || 0),
  };
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens) body.max_tokens = Number(maxTokens);
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  document.body.dataset.state = on ? "streaming" : "idle";
}

async function send(text) {
  setStatus("");
  busy(true);
  const box = addMessage("user", text);
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  reply.classList.add("streaming");
  let written = "";
  let sent = false;
  controller = new AbortController();
  try {
    if (!modelId) await loadModel();
    conversation.push({ role: "user", content: text });
    sent = true;
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    for await (const chunk of events(resp.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : undefined;
      if (delta) {
        written += delta;
        out.textContent = written;
        reply.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      setStatus("error: " + e.message);
      if (!written) box.classList.add("error");
    }
  } finally {
    if (written) {
      conversation.push({ role: "assistant", content: written });
    } else { // nothing to keep: forget the turn, so the message can be sent again
      if (sent) conversation.pop();
      reply.remove();
    }
    reply.classList.remove("streaming");
    controller = null;
    busy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  busy(false);
  loadModel().catch((e) => setStatus(e.message + " (enter the API key under Settings if the server needs one)"));
  $("api-key").addEventListener("change", () => loadModel().then(() => setStatus(""), (e) => setStatus(e.message)));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation.length = 0;
    $("log").replaceChildren();
    setStatus("");
  });
});
