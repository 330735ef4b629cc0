// The explain page: renders the JSON of POST /v1/explain (docs/explain.md, the same data as
// `pellucid explain --json`). It computes nothing about the model; it only lays the data out.
// Changing layer, head or word redraws from the data at hand; changing a sampling setting asks
// the server again.
'use strict';

const $ = (id) => document.getElementById(id);
let data = null;  // the last explain JSON
let latest = 0;  // the number of the newest request: an older answer arriving late is dropped
let pending = 0;  // requests in flight; the Explain button waits for all of them

function number(id) {
  const v = $(id).value.trim();
  return v === '' ? null : Number(v);
}

function requestBody() {
  const body = {prompt: $('prompt').value, temperature: number('temperature') || 0, steps: number('steps') || 0};
  for (const [key, id] of [['top_k', 'top-k'], ['top_p', 'top-p'], ['min_p', 'min-p'], ['seed', 'seed']]) {
    const v = number(id);
    if (v !== null) body[key] = v;
  }
  return body;
}

async function run() {
  const status = $('status');
  status.className = 'muted';
  status.textContent = 'Running the model…';
  $('run').disabled = true;
  const mine = ++latest;
  pending++;
  try {
    const res = await apiFetch('/v1/explain', {method: 'POST', body: JSON.stringify(requestBody())});
    const answer = res.ok ? await res.json() : new Error(await errorText(res));
    if (mine !== latest) return;
    if (answer instanceof Error) throw answer;
    data = answer;
    const m = data.model;
    status.textContent = `${data.tokens.length} tokens · ${m.n_layer} layers of ${m.n_head} attention heads · ` +
      `${m.params.toLocaleString('en')} parameters`;
    show();
  } catch (err) {
    if (mine !== latest) return;
    status.className = 'error';
    status.textContent = err.message;
  } finally {
    $('run').disabled = --pending > 0;
  }
}

const word = (t) => '«' + visible(t) + '»';

// A <select> filled with `labels`, keeping its current choice when it is still valid.
function fill(select, labels, fallback) {
  const keep = select.value;
  select.replaceChildren(...labels.map((label, i) => el('option', {value: String(i), textContent: label})));
  select.value = keep !== '' && Number(keep) < labels.length ? keep : String(fallback);
}

function show() {
  const T = data.tokens.length, L = data.attention.length;
  fill($('layer'), data.attention.map((_, i) => `layer ${i + 1}` + (i === 0 ? ' (first)' : i === L - 1 ? ' (last)' : '')), L - 1);
  fill($('head'), data.attention[0].heads.map((_, i) => `head ${i + 1}`), 0);
  $('position').value = '';  // a new prompt: start at its last word
  fill($('position'), data.tokens.map((t) => `${t.index + 1}: ${visible(t.text)}`), T - 1);
  $('tokens').replaceChildren(...data.tokens.map((t) => {
    const chip = el('button', {type: 'button', className: 'chip', textContent: visible(t.text), title: `token id ${t.id}, bytes ${t.bytes}`});
    chip.onclick = () => { $('position').value = String(t.index); drawAttention(); };
    return chip;
  }));
  drawAttention();
  showLens();
  showStages();
  showSteps();
  $('result').hidden = false;
}

// --- attention -----------------------------------------------------------------------------

function heatColor(x) {  // 0 -> white, 1 -> the accent blue; sqrt so small weights still show
  const v = Math.sqrt(Math.max(0, Math.min(1, x)));
  return `rgb(${Math.round(255 - 208 * v)},${Math.round(255 - 164 * v)},${Math.round(255 - 44 * v)})`;
}

function drawAttention() {
  const layer = Number($('layer').value), head = Number($('head').value), pos = Number($('position').value);
  const weights = data.attention[layer].heads[head].weights;  // T x T, row = the word that looks
  const labels = data.tokens.map((t) => visible(t.text));
  const T = labels.length, cell = Math.max(6, Math.min(34, Math.floor(440 / T)));
  const canvas = $('heatmap');
  let ctx = canvas.getContext('2d');
  ctx.font = '12px ui-monospace, monospace';
  const pad = cell >= 12 ? Math.min(120, Math.max(...labels.map((s) => ctx.measureText(s).width)) + 8) : 0;
  canvas.width = canvas.height = pad + T * cell;
  ctx = canvas.getContext('2d');  // resizing resets the context's state
  ctx.font = '12px ui-monospace, monospace';
  for (let r = 0; r < T; r++) {
    for (let c = 0; c < T; c++) {
      ctx.fillStyle = c > r ? '#f1f2f4' : heatColor(weights[r][c]);  // above the diagonal: the future
      ctx.fillRect(pad + c * cell, pad + r * cell, cell - 1, cell - 1);
    }
  }
  if (pad) {
    ctx.fillStyle = '#1d2330';
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    labels.forEach((s, i) => ctx.fillText(s, pad - 4, pad + i * cell + cell / 2, pad - 6));
    labels.forEach((s, i) => {
      ctx.save();
      ctx.translate(pad + i * cell + cell / 2, pad - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = 'left';
      ctx.fillText(s, 0, 0, pad - 6);
      ctx.restore();
    });
  }
  ctx.strokeStyle = '#e0522d';
  ctx.lineWidth = 2;
  ctx.strokeRect(pad, pad + pos * cell, T * cell - 1, cell - 1);
  canvas.onmousemove = (ev) => {
    const box = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - box.left - pad) / cell), r = Math.floor((ev.clientY - box.top - pad) / cell);
    if (r < 0 || c < 0 || r >= T || c > r) return;
    $('cell').textContent = `${word(labels[r])} looks at ${word(labels[c])}: ${pct(weights[r][c])}`;
  };
  showLooks(weights[pos], pos, layer, head);
  document.querySelectorAll('#tokens .chip').forEach((chip, i) => chip.classList.toggle('selected', i === pos));
}

function showLooks(row, pos, layer, head) {
  const last = pos === data.tokens.length - 1 ? ' (the last word)' : '';
  $('looks-title').textContent = `What ${word(data.tokens[pos].text)}${last} looks at, in layer ${layer + 1}, head ${head + 1}`;
  const order = row.map((w, i) => [w, i]).slice(0, pos + 1).sort((a, b) => b[0] - a[0]).slice(0, 8);
  $('looks').replaceChildren(...order.map(([w, i]) => el('tr', {},
    el('td', {}, el('code', {textContent: visible(data.tokens[i].text)})),
    el('td', {className: 'muted', textContent: `word ${i + 1}`}),
    el('td', {}, bar(w)), el('td', {className: 'num', textContent: pct(w)}))));
}

// --- logit lens and sampling ---------------------------------------------------------------

function candidates(top, n, chosenId) {
  return el('div', {className: 'cands'}, ...top.slice(0, n).map((t) => el('span', {className: 'cand' + (t.id === chosenId ? ' chosen' : '')},
    el('code', {textContent: visible(t.text)}), ' ', bar(t.prob), ' ', pct(t.prob))));
}

function showLens() {
  const lens = data.logit_lens, last = data.tokens[data.tokens.length - 1].text;
  const rows = lens.map((entry, i) => {
    const label = i === 0 ? 'from the word alone (embeddings)'
      : `the model's guess after layer ${entry.layer + 1}` + (i === lens.length - 1 ? ' (its answer)' : '');
    return el('tr', {}, el('th', {textContent: label}), el('td', {}, candidates(entry.top, 5)));
  });
  $('lens').replaceChildren(el('caption', {className: 'muted', textContent: `the word after ${word(last)}`}), ...rows);
}

function stageTitle(s) {
  const v = s.value;
  switch (s.name) {
    case 'softmax': return "The model's probabilities (softmax of its scores)";
    case 'repetition_penalty': return `Words already used made less likely (repetition penalty ${v})`;
    case 'top_k': return `Only the ${v} most likely words kept (top-k)`;
    case 'top_p': return `The most likely words until they add up to ${pct(v)} (top-p)`;
    case 'min_p': return `Words under ${pct(v)} of the best one's probability dropped (min-p)`;
    case 'temperature': return v === 0 ? 'Temperature 0: always the most likely word' : `Temperature ${v} (below 1 sharpens, above 1 flattens)`;
    default: return s.name;
  }
}

function showStages() {
  const nt = data.next_token, chosen = nt.chosen;
  $('stages').replaceChildren(...nt.stages.map((s, i) => el('div', {className: 'stage'},
    el('h3', {textContent: `${i + 1}. ${stageTitle(s)}`}),
    el('div', {className: 'muted', textContent: s.kept === 1 ? 'one candidate left' : `${s.kept.toLocaleString('en')} candidates left`}),
    el('table', {}, ...s.top.slice(0, 8).map((t) => el('tr', {className: t.id === chosen.id ? 'chosen' : ''},
      el('td', {}, el('code', {textContent: visible(t.text)})), el('td', {}, bar(t.prob)),
      el('td', {className: 'num', textContent: pct(t.prob)})))))));
  $('chosen').replaceChildren('The model picks ', el('strong', {}, el('code', {textContent: visible(chosen.text)})),
    `: ${pct(chosen.prob)} after the steps above, ${pct(Math.exp(chosen.model_logprob))} in the model's own probabilities.`);
}

function showSteps() {
  const steps = data.steps || [];
  $('steps-section').hidden = !steps.length;
  const head = el('tr', {}, ...['word', 'probability', 'other candidates', 'computed', 'the cache holds']
    .map((h) => el('th', {textContent: h})));
  $('steps-table').replaceChildren(head, ...steps.map((s) => el('tr', {},
    el('td', {}, el('code', {textContent: visible(s.text)})),
    el('td', {className: 'num', textContent: pct(Math.exp(s.logprob))}),
    el('td', {className: 'muted', textContent: s.top.filter((t) => t.id !== s.id).slice(0, 3).map((t) => `${visible(t.text)} ${pct(Math.exp(t.logprob))}`).join('  ')}),
    el('td', {textContent: s.new_tokens_computed === 1 ? '1 new token' : `the whole prompt (${s.new_tokens_computed} tokens)`}),
    el('td', {textContent: `${s.kv_cache_tokens} tokens (${(s.kv_cache_bytes / 1024).toFixed(1)} KiB)`}))));
}

function init() {
  $('ask').addEventListener('submit', (ev) => { ev.preventDefault(); run(); });
  for (const id of ['temperature', 'top-k', 'top-p', 'min-p', 'seed', 'steps']) $(id).addEventListener('change', run);
  for (const id of ['layer', 'head', 'position']) $(id).addEventListener('change', drawAttention);
  const prompt = new URLSearchParams(location.search).get('prompt');  // /explain?prompt=...
  if (prompt) $('prompt').value = prompt;
  run();
}

document.addEventListener('DOMContentLoaded', init);
