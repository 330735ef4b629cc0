// A small Markdown view of model text, built from DOM nodes: no HTML string is ever parsed.
// Supported: ``` code fences, # headings, - and 1. lists, paragraphs, `code`, **bold**, *italic*
// and [links](https://...). Anything else (raw HTML included) stays visible as plain text.
// Links go only to http(s) addresses and open in a new tab without a referrer; images are shown
// as links, never loaded.
'use strict';

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|(!?\[[^\]\n]*\]\([^)\s]*\))/g;

function safeUrl(url) {
  try {
    const u = new URL(url);
    return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : null;
  } catch (e) {
    return null;
  }
}

// One line of text -> nodes for code, bold, italic and links; the rest as text nodes.
function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const s = m[0];
    if (m[1]) out.push(el('code', {textContent: s.slice(1, -1)}));
    else if (m[2]) out.push(el('strong', {textContent: s.slice(2, -2)}));
    else if (m[3]) out.push(el('em', {textContent: s.slice(1, -1)}));
    else {
      const image = s.startsWith('!');
      const label = s.slice(image ? 2 : 1, s.indexOf(']('));
      const href = safeUrl(s.slice(s.indexOf('](') + 2, -1));
      if (href) {
        const a = el('a', {href, target: '_blank', rel: 'noopener noreferrer nofollow'});
        a.textContent = image ? 'image: ' + (label || href) : label || href;
        out.push(a);
      } else out.push(s);  // javascript:, data: and the like stay visible, as text
    }
    last = m.index + s.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function withBreaks(lines) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i) nodes.push(el('br'));
    nodes.push(...inline(line));
  });
  return nodes;
}

// Markdown text -> a DocumentFragment of block elements.
function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = text.split('\n');
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^\s*```/.test(line)) {  // a fence: everything up to the closing fence, verbatim
      const body = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) body.push(lines[i]);
      i++;
      frag.append(el('pre', {}, el('code', {textContent: body.join('\n')})));
    } else if (/^#{1,6}\s/.test(line)) {
      const level = Math.min(6, line.match(/^#+/)[0].length + 2);  // h3..h6 inside a message
      frag.append(el('h' + level, {}, ...inline(line.replace(/^#+\s*/, ''))));
      i++;
    } else if (/^\s*([-*+]|\d+[.)])\s/.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? 'ol' : 'ul');
      for (; i < lines.length && /^\s*([-*+]|\d+[.)])\s/.test(lines[i]); i++) {
        list.append(el('li', {}, ...inline(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ''))));
      }
      frag.append(list);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !/^(\s*```|#{1,6}\s|\s*([-*+]|\d+[.)])\s)/.test(lines[i]); i++) {
        para.push(lines[i]);
      }
      frag.append(el('p', {}, ...withBreaks(para)));
    }
  }
  return frag;
}
