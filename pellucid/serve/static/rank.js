// The ranking page: order the K replies to a prompt best first (click, keys or drag), tie, skip,
// undo. Each save is one POST that the server commits before it answers. Replies are model text:
// they reach the page only as textContent, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
let current = null;  // {prompt: {id, text}, responses: [{id, text}]} being ranked
let order = [];  // placed replies, best first: {id, tie}; tie = same place as the one above
let busy = false;  // a request is on its way: keys and buttons wait

const ranker = () => $('ranker').value.trim();
const number = (id) => current.responses.findIndex((r) => r.id === id) + 1;
const placed = (id) => order.some((o) => o.id === id);

// The order as the API wants it: groups of tied ids, best group first.
function groups() {
  const out = [];
  for (const o of order) (o.tie && out.length ? out[out.length - 1] : out[out.push([]) - 1]).push(o.id);
  return out;
}

function place(id, at) {
  unplace(id);
  order.splice(at === undefined ? order.length : at, 0, {id, tie: false});
  render();
}

function unplace(id) {
  const i = order.findIndex((o) => o.id === id);
  if (i < 0) return;
  // the reply tied to this one now starts its own place (or keeps the tie this one had)
  if (order[i + 1] && order[i + 1].tie) order[i + 1].tie = order[i].tie;
  order.splice(i, 1);
  if (order.length) order[0].tie = false;
  render();
}

function toggleTie(i) {
  if (i > 0 && order[i]) order[i].tie = !order[i].tie;
  render();
}

function card(reply, index) {
  const tied = index !== undefined && order[index].tie;
  const text = el('div', {className: 'text'}, reply.text);
  if (!reply.text) text.append(el('span', {className: 'empty', textContent: '(empty reply)'}));
  const li = el('li', {className: 'card' + (tied ? ' tied' : ''), draggable: true},
    el('span', {className: 'place'}, index === undefined ? '' : tied ? '=' : placeOf(index) + '.'),
    el('span', {className: 'num', textContent: '#' + number(reply.id)}), text);
  li.dataset.id = reply.id;
  if (index > 0) {
    const tie = el('button', {type: 'button', className: 'tie', textContent: '=',
      title: 'tie with the reply above'});
    tie.onclick = (ev) => { ev.stopPropagation(); toggleTie(index); };
    li.append(tie);
  }
  li.onclick = () => (index === undefined ? place(reply.id) : unplace(reply.id));
  li.ondragstart = (ev) => ev.dataTransfer.setData('text/plain', String(reply.id));
  li.ondragover = (ev) => ev.preventDefault();
  li.ondrop = (ev) => {  // dropped on a card: take that card's place (or back to the pool)
    ev.preventDefault();
    ev.stopPropagation();
    const id = Number(ev.dataTransfer.getData('text/plain'));
    if (index === undefined) unplace(id);
    else if (id !== reply.id) place(id, order.findIndex((o) => o.id === reply.id));
  };
  return li;
}

// The place number shown for order[index]: tied replies share one.
function placeOf(index) {
  let place = 0;
  for (let i = 0; i <= index; i++) if (!order[i].tie) place++;
  return place;
}

function render() {
  const byId = new Map(current.responses.map((r) => [r.id, r]));
  $('order').replaceChildren(...order.map((o, i) => card(byId.get(o.id), i)));
  $('pool').replaceChildren(...current.responses.filter((r) => !placed(r.id)).map((r) => card(r)));
  $('save').disabled = busy || order.length !== current.responses.length;
}

function show(data) {
  $('model').textContent = data.model;
  if (!ranker()) $('ranker').value = data.ranker;
  current = data.prompt ? data : null;
  order = [];
  $('work').hidden = !current;
  $('done').hidden = !!current;
  $('status').textContent = data.remaining + ' left to rank as ' + data.ranker;
  if (current) {
    $('prompt').textContent = current.prompt.text;
    render();
  }
}

async function call(path, body) {
  busy = true;
  $('error').textContent = '';
  try {
    const res = body === undefined ? await apiFetch(path) : await apiFetch(path, {method: 'POST', body: JSON.stringify(body)});
    if (!res.ok) throw new Error(await errorText(res));
    return await res.json();
  } catch (e) {
    $('error').textContent = e.message;
    return null;
  } finally {
    busy = false;
  }
}

async function load() {
  const data = await call('/v1/rank/next?ranker=' + encodeURIComponent(ranker()));
  if (data) {
    localStorage.setItem('pellucid-ranker', data.ranker);
    show(data);
  }
}

async function send(extra, message) {
  if (busy || !current) return;
  const saved = await call('/v1/rank', Object.assign({ranker: ranker(), prompt_id: current.prompt.id}, extra));
  if (saved) await load();
  if (saved) $('status').textContent += ' · ' + message;
}

const save = () => order.length === current.responses.length && send({order: groups()}, 'saved');
const skip = () => send({skip: true}, 'skipped');

async function undo() {
  if (busy) return;
  const res = await call('/v1/rank/undo', {ranker: ranker()});
  if (res) await load();
  if (res) $('status').textContent += res.undone ? ' · took back the last one' : ' · nothing to undo';
}

document.addEventListener('keydown', (ev) => {
  if (busy || ev.target.tagName === 'INPUT' || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const key = ev.key.toLowerCase();
  if (key === 'u') return undo();
  if (!current) return;
  const n = Number(ev.key);
  if (n >= 1 && n <= current.responses.length) place(current.responses[n - 1].id);
  else if (key === 't' || key === '=') toggleTie(order.length - 1);
  else if (key === 'backspace' && order.length) unplace(order[order.length - 1].id);
  else if (key === 'enter') save();
  else if (key === 's') skip();
  else return;
  ev.preventDefault();
});

$('order').ondragover = (ev) => ev.preventDefault();
$('order').ondrop = (ev) => { ev.preventDefault(); place(Number(ev.dataTransfer.getData('text/plain'))); };
$('pool').ondragover = (ev) => ev.preventDefault();
$('pool').ondrop = (ev) => { ev.preventDefault(); unplace(Number(ev.dataTransfer.getData('text/plain'))); };
$('save').onclick = save;
$('skip').onclick = skip;
$('undo').onclick = undo;
$('ranker').onchange = load;
$('ranker').value = localStorage.getItem('pellucid-ranker') || '';
load();
