// The chat page: streams the model's reply token by token from the OpenAI-compatible API
// (POST /v1/chat/completions with stream: true) and can read it aloud with the browser's own
// speech synthesis. Messages go into the page as text, never as HTML.
"use strict";

const $ = id => document.getElementById(id);
const history = [];
let model = null;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = model;
    $("weights").textContent = body.data[0].weights || "–";
  } catch (e) {
    $("model").textContent = "unavailable";
  }
}

function params() {
  const num = id => Number($(id).value);
  return {temperature: num("temperature"), top_k: Math.round(num("top_k")), top_p: num("top_p"),
          repetition_penalty: num("repetition_penalty"), max_tokens: Math.round(num("max_tokens"))};
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text) return;
  if (!model) await loadModel();
  $("prompt").value = "";
  $("send").disabled = true;
  history.push({role: "user", content: text});
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify({model, messages: history, stream: true, ...params()})});
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const delta = JSON.parse(event.slice(6)).choices[0].delta.content;
        if (delta) {
          answer += delta;
          reply.textContent = answer;
          reply.dataset.chunks = String(Number(reply.dataset.chunks || 0) + 1);
        }
      }
    }
    history.push({role: "assistant", content: answer});
    if ($("tts").checked && "speechSynthesis" in window && answer) {
      speechSynthesis.speak(new SpeechSynthesisUtterance(answer));
    }
  } catch (e) {
    history.pop();
    reply.className = "msg error";
    reply.textContent = `error: ${e.message}`;
  } finally {
    reply.dataset.state = "done";
    $("send").disabled = false;
  }
}

$("send").addEventListener("click", send);
$("prompt").addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("messages").replaceChildren();
  if ("speechSynthesis" in window) speechSynthesis.cancel();
});
$("api_key").value = localStorage.getItem("hived_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("hived_api_key", $("api_key").value); loadModel(); });
loadModel();
