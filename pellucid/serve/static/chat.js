// The chat page: streams replies from /v1/chat/completions (OpenAI's SSE chunks) and shows,
// for every token of a reply, the probability the model gave it and the alternatives it had.
'use strict';

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content} of the turns so far, sent with every request
const tokenData = new WeakMap();  // token <span> -> its logprobs entries
let modelId = null;
let controller = null;  // the AbortController of the reply being streamed
let chatNumber = 0;  // "New chat" bumps it, so a reply still finishing cannot join the new chat

// --- streaming -----------------------------------------------------------------------------

// Read server-sent events from a fetch Response and call onData with each parsed JSON chunk,
// until `data: [DONE]`. A stream that ends without it was cut off: that is an error, not a reply.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error('the reply broke off: the server closed the stream before it ended');
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trim()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onData(chunk);
    }
  }
}

// --- rendering a reply ---------------------------------------------------------------------

// The shading class of a token of probability p: none when the model was sure of it.
function shade(p) {
  return p >= 0.8 ? 'p1' : p >= 0.5 ? 'p2' : p >= 0.2 ? 'p3' : 'p4';
}

function newMessage(role, label) {
  const body = el('div', {className: 'body'});
  const msg = el('div', {className: 'msg ' + role}, el('div', {className: 'role', textContent: label}), body);
  $('messages').append(msg);
  $('messages').scrollTop = $('messages').scrollHeight;
  return {msg, body};
}

function newReply() {
  const {msg, body} = newMessage('assistant', modelId || 'assistant');
  return {msg, body, text: '', pending: [], logprobs: [], started: performance.now(), finish: null};
}

// Append `text` as one token span carrying `entries` (logprobs). Entries of a token that added no
// text yet (part of a character) wait in `pending` for the next span.
function addPiece(reply, text, entries) {
  entries = reply.pending.concat(entries);
  reply.logprobs.push(...entries.slice(reply.pending.length));
  if (!text) {
    reply.pending = entries;
    return;
  }
  reply.pending = [];
  const span = el('span', {className: 'tok', textContent: text});
  if (text.includes('\n')) span.classList.add('nl');  // CSS draws a ↵ there, to hover over
  if (entries.length) {
    tokenData.set(span, entries);
    span.classList.add(shade(Math.exp(entries[0].logprob)));
  }
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 60;
  reply.body.append(span);
  reply.text += text;
  if (atBottom) list.scrollTop = list.scrollHeight;  // follow the reply unless the reader scrolled up
}

function onChunk(reply, chunk) {
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  if (choice.finish_reason) reply.finish = choice.finish_reason;
  const text = (choice.delta && choice.delta.content) || '';
  const entries = (choice.logprobs && choice.logprobs.content) || [];
  if (entries.length > 1) {  // several tokens in one delta: one span each when their bytes agree
    const dec = new TextDecoder();
    const pieces = entries.map((e) => (e.bytes ? dec.decode(new Uint8Array(e.bytes), {stream: true}) : e.token));
    if (pieces.join('') === text) {
      entries.forEach((e, i) => addPiece(reply, pieces[i], [e]));
      return;
    }
  }
  addPiece(reply, text, entries);
}

// The line under a finished reply: how sure the model was overall, and a Markdown view toggle.
function finishReply(reply, note) {
  const n = reply.logprobs.length;
  const parts = [];
  if (n) {
    const mean = reply.logprobs.reduce((s, e) => s + Math.exp(e.logprob), 0) / n;
    const seconds = (performance.now() - reply.started) / 1000;
    parts.push(n === 1 ? '1 token' : `${n} tokens`, `average probability ${pct(mean)}`, `${(n / seconds).toFixed(1)} tokens/s`);
  }
  if (reply.finish === 'length') parts.push('stopped at max tokens');
  if (note) parts.push(note);
  const foot = el('div', {className: 'foot muted', textContent: parts.join(' · ')});
  if (reply.text) {
    const tokens = reply.body;
    const formatted = el('div', {className: 'body markdown', hidden: true}, renderMarkdown(reply.text));
    const toggle = el('button', {type: 'button', className: 'link', textContent: 'formatted'});
    toggle.onclick = () => {
      formatted.hidden = !formatted.hidden;
      tokens.hidden = !formatted.hidden;
      toggle.textContent = formatted.hidden ? 'formatted' : 'tokens';
    };
    tokens.after(formatted);
    foot.append(' · ', toggle);
  }
  reply.msg.append(foot);
}

// --- the token tooltip: the probability calculation ----------------------------------------

function showTip(span) {
  const entries = tokenData.get(span);
  if (!entries) return;
  const tip = $('tip');
  tip.replaceChildren();
  for (const e of entries) {
    const p = Math.exp(e.logprob);
    tip.append(el('div', {className: 'tip-head'}, el('code', {textContent: visible(e.token)}), ' ' + pct(p)));
    tip.append(el('div', {className: 'muted', textContent: `p = exp(${e.logprob.toFixed(3)}) = ${p.toFixed(4)}`}));
    const alts = e.top_logprobs || [];
    if (alts.length) tip.append(el('div', {className: 'muted', textContent: 'what the model considered:'}));
    const table = el('table', {className: 'alts'});
    for (const a of alts) {
      const q = Math.exp(a.logprob);
      const row = el('tr', {className: a.token === e.token ? 'chosen' : ''},
        el('td', {}, el('code', {textContent: visible(a.token)})), el('td', {}, bar(q)),
        el('td', {className: 'num', textContent: pct(q)}));
      table.append(row);
    }
    tip.append(table);
  }
  const r = span.getBoundingClientRect();
  tip.hidden = false;
  tip.style.left = Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 8)) + 'px';
  const below = r.bottom + 6;
  tip.style.top = (below + tip.offsetHeight < window.innerHeight ? below : Math.max(4, r.top - tip.offsetHeight - 6)) + 'px';
}

// --- sending -------------------------------------------------------------------------------

function requestBody() {
  const system = $('system').value.trim();
  const messages = (system ? [{role: 'system', content: system}] : []).concat(conversation);
  const body = {
    messages, stream: true, logprobs: true, top_logprobs: 5,
    temperature: Number($('temperature').value), top_p: Number($('top-p').value),
    max_tokens: Number($('max-tokens').value) || 256,
  };
  if (modelId) body.model = modelId;
  return body;
}

function setBusy(busy) {
  $('send').disabled = busy;
  $('stop').disabled = !busy;
}

async function send(text) {
  conversation.push({role: 'user', content: text});
  newMessage('user', 'you').body.textContent = text;
  const reply = newReply();
  const chat = chatNumber;
  controller = new AbortController();
  setBusy(true);
  let note = null;
  try {
    const res = await apiFetch('/v1/chat/completions',
      {method: 'POST', body: JSON.stringify(requestBody()), signal: controller.signal});
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (chunk) => onChunk(reply, chunk));
  } catch (err) {
    if (err.name === 'AbortError') note = 'stopped';
    else reply.msg.append(el('div', {className: 'error', textContent: err.message}));
  }
  if (chat === chatNumber) {
    if (reply.text) conversation.push({role: 'assistant', content: reply.text});
    else conversation.pop();  // nothing came back: the next request should not repeat this turn
  }
  finishReply(reply, note);
  controller = null;
  setBusy(false);
}

async function loadModel() {
  const res = await apiFetch('/v1/models');
  if (!res.ok) return;
  const list = (await res.json()).data || [];
  if (list.length) modelId = list[0].id;
  $('model').textContent = modelId ? 'model: ' + modelId : '';
}

function init() {
  for (const id of ['temperature', 'top-p']) {
    const out = () => { $(id + '-out').textContent = $(id).value; };
    $(id).addEventListener('input', out);
    out();
  }
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('input').value;
    if (!text.trim() || controller) return;
    $('input').value = '';
    send(text);
  });
  $('input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('stop').addEventListener('click', () => controller && controller.abort());
  $('new-chat').addEventListener('click', () => {
    if (controller) controller.abort();
    chatNumber++;
    conversation.length = 0;
    $('messages').replaceChildren();
  });
  const messages = $('messages');
  messages.addEventListener('mouseover', (ev) => {
    const span = ev.target.closest && ev.target.closest('.tok');
    if (span) showTip(span);
  });
  messages.addEventListener('mouseout', (ev) => {
    if (ev.target.closest && ev.target.closest('.tok')) $('tip').hidden = true;
  });
  loadModel();
}

document.addEventListener('DOMContentLoaded', init);
