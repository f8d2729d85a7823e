// The web chat of `nanoforge serve` (nanoforge/infer/server.py). It keeps the conversation in memory,
// sends it whole to /v1/chat/completions with `stream: true`, and reads the Server-Sent Events through
// fetch + ReadableStream. Every text (the model's, the user's, error messages) is set with textContent,
// never as HTML: whatever the model writes, `<script>` included, shows as text. A conversation grown past
// the model's context loses its oldest turns, as the terminal chat's does; they stay on screen, greyed.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} of every turn still sent
const boxes = []; // the message element of each turn in `conversation`
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

// {message, code} of a failed response: the server's OpenAI-shaped error, or the status line.
async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return body.error;
  } catch (_) {
    // not JSON: fall back to the status line
  }
  return { message: `${resp.status} ${resp.statusText}`, code: null };
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) throw new Error((await errorOf(resp)).message);
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

// The streaming response to the conversation. While the server says it exceeds the context, the oldest
// turns are dropped (up to the next user message) and it is asked again; the newest message alone must fit.
async function post(signal) {
  let dropped = 0;
  for (;;) {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request()), signal,
    });
    if (resp.ok) {
      if (dropped) setStatus(`(dropped the oldest ${dropped} messages: the model's context is full)`);
      return resp;
    }
    const error = await errorOf(resp);
    if (error.code !== "context_length_exceeded" || conversation.length <= 1) throw new Error(error.message);
    do {
      conversation.shift();
      boxes.shift().classList.add("dropped");
      dropped += 1;
    } while (conversation.length > 1 && conversation[0].role !== "user");
  }
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
    boxes.push(box);
    sent = true;
    const resp = await post(controller.signal);
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
      boxes.push(reply);
    } else { // nothing to keep: forget the turn, so the message can be sent again
      if (sent) {
        conversation.pop();
        boxes.pop();
      }
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
    boxes.length = 0;
    $("log").replaceChildren();
    setStatus("");
  });
});
