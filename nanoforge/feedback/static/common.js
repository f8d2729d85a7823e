// Shared by the pages of `nanoforge label`: the annotator's token (kept in sessionStorage, sent as a bearer
// token) and JSON calls to /api/. Texts are only ever written with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("nanoforge-label-token") || "";
}

function setToken(value) {
  if (value) sessionStorage.setItem("nanoforge-label-token", value);
  else sessionStorage.removeItem("nanoforge-label-token");
}

function setStatus(text) {
  $("status").textContent = text;
}

class AuthError extends Error {}

async function api(path, body) {
  const init = { headers: { Authorization: "Bearer " + token() } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch("/api/" + path, init);
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    // not JSON: the status line says what happened
  }
  if (resp.status === 401 || resp.status === 403) throw new AuthError((data && data.error) || "not allowed");
  if (!resp.ok) throw new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
  return data;
}

// Show the login form until a token works; `start` runs once one does.
function withLogin(start) {
  const begin = () => start().catch((e) => {
    if (e instanceof AuthError) {
      setToken("");
      $("login").hidden = false;
    }
    setStatus(e.message);
  });
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("token").value.trim());
    $("token").value = "";
    $("login").hidden = true;
    setStatus("");
    begin();
  });
  if (token()) begin();
  else $("login").hidden = false;
}
