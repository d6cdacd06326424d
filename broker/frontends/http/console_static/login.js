// The console's login page: posts the form as JSON (the broker sets a session cookie).
"use strict";
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const error = document.getElementById("login-error");
  error.textContent = "";
  const resp = await fetch("/console/login", {
    method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({user: form.user.value, password: form.password.value}),
  });
  if (resp.ok) { location.href = "/"; return; }
  let message = `HTTP ${resp.status}`;
  try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
  error.textContent = message;
});
