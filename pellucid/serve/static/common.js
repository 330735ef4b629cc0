// Helpers both pages share: building DOM safely, API calls with the optional key, formatting.
// Model text only ever reaches the page through textContent / text nodes, never as HTML.
'use strict';

// el('div', {className: 'x'}, 'text', child): an element with properties and children.
// Strings become text nodes, so nothing passed here is ever parsed as HTML.
function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) node[k] = v;
  for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
  return node;
}

// A token's text with its spaces and line breaks made visible (' the' -> '␣the') and other
// control characters written as \xNN, as the terminal view of `pellucid explain` does.
function visible(text) {
  return String(text).replace(/ /g, '␣').replace(/\n/g, '↵').replace(/\t/g, '⇥')
    .replace(/[\x00-\x1f\x7f]/g, (c) => '\\x' + c.charCodeAt(0).toString(16).padStart(2, '0'));
}

function pct(p) {
  if (p >= 0.9995) return '100%';
  if (p < 0.001) return p > 0 ? '<0.1%' : '0%';
  return (p * 100).toFixed(p < 0.1 ? 1 : 0) + '%';
}

// A horizontal bar of probability p: the width is set through the CSSOM, which the page's
// Content-Security-Policy allows (inline style attributes it would not).
function bar(p) {
  const fill = el('span', {className: 'fill'});
  fill.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + '%';
  return el('span', {className: 'bar'}, fill);
}

// --- the API key ---------------------------------------------------------------------------
// Kept in sessionStorage (gone when the tab closes), asked for only when the server answers 401.
const KEY = 'pellucid-api-key';

function askKey(message) {
  return new Promise((resolve) => {
    let form = document.getElementById('keyform');
    if (!form) {
      form = el('form', {id: 'keyform', className: 'keybar'},
        el('span', {id: 'keymsg'}),
        el('input', {id: 'key', type: 'password', placeholder: 'API key', autocomplete: 'off'}),
        el('button', {type: 'submit', textContent: 'Use key'}));
      document.body.prepend(form);
    }
    document.getElementById('keymsg').textContent = message;
    form.hidden = false;
    form.onsubmit = (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, document.getElementById('key').value.trim());
      form.hidden = true;
      resolve();
    };
    document.getElementById('key').focus();
  });
}

// fetch() with JSON headers and the key; on 401 asks for a key and tries again.
async function apiFetch(path, options) {
  for (;;) {
    const headers = {'Content-Type': 'application/json'};
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = 'Bearer ' + key;
    const res = await fetch(path, Object.assign({}, options, {headers}));
    if (res.status !== 401) return res;
    await askKey(key ? 'That key was refused; try another:' : 'This server needs an API key:');
  }
}

// The one-line message of an error response (OpenAI's {"error": {"message": ...}} shape).
async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return res.status + ' ' + res.statusText;
  }
}
